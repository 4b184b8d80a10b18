"""Customers, and the one-time codes they log in with."""

import secrets

from django.db import models
from django.utils.crypto import salted_hmac

CODE_DIGITS = 6


def _new_nonce() -> str:
    return secrets.token_hex(16)


class Customer(models.Model):
    """A customer: logs in by e-mail address, gets codes by SMS (and by e-mail)."""

    email = models.EmailField(unique=True)
    phone = models.CharField(max_length=16)

    def __str__(self) -> str:
        return self.email


class LoginCode(models.Model):
    """One login code, sent by SMS; by e-mail too when the SMS does not arrive in time.

    The code itself is stored nowhere: it is derived from the row's random nonce with the
    project's SECRET_KEY (:meth:`code`). So the database alone does not reveal it, and a
    task that needs it (the e-mail fallback) is given the row's id, never the code: task
    arguments travel through the broker and show in logs and in Flower.
    """

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="login_codes")
    nonce = models.CharField(max_length=32, default=_new_nonce, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    failed_attempts = models.PositiveSmallIntegerField(default=0)
    # The SMS: its SMSBAT id and the tracker's outcome (delivered, timeout, ...).
    message_id = models.CharField(max_length=64, blank=True)
    sms_outcome = models.CharField(max_length=20, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"login code #{self.pk} of {self.customer_id}"

    def code(self) -> str:
        """The code: the same every time it is asked for, for the SMS and the e-mail."""
        digest = salted_hmac("accounts.LoginCode", self.nonce, algorithm="sha256").digest()
        return f"{int.from_bytes(digest[:8], 'big') % 10**CODE_DIGITS:0{CODE_DIGITS}d}"
