"""Requesting a login code, and checking one."""

import functools
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from accounts.models import Customer, LoginCode
from accounts.tasks import send_login_code

__all__ = ["MAX_FAILED_ATTEMPTS", "request_login_code", "verify_login_code"]

# Wrong guesses a code survives: six digits are not many.
MAX_FAILED_ATTEMPTS = 5


def request_login_code(customer: Customer) -> LoginCode:
    """Create a login code for ``customer``; once committed, send it by SMS and track it."""
    with transaction.atomic():
        login_code = LoginCode.objects.create(
            customer=customer,
            expires_at=timezone.now() + timedelta(seconds=settings.SHOP_LOGIN_CODE_TTL),
        )
        transaction.on_commit(functools.partial(send_login_code, login_code.pk), robust=True)
    return login_code


def verify_login_code(email: str, code: str) -> Customer | None:
    """The customer whose valid login code ``code`` is (it is used up then), or None."""
    now = timezone.now()
    candidates = LoginCode.objects.filter(
        customer__email=email,
        used_at__isnull=True,
        expires_at__gt=now,
        failed_attempts__lt=MAX_FAILED_ATTEMPTS,
    ).select_related("customer")
    for login_code in candidates:
        if constant_time_compare(login_code.code(), code):
            # Used once: of two concurrent logins with the same code, one wins.
            if LoginCode.objects.filter(pk=login_code.pk, used_at__isnull=True).update(used_at=now):
                return login_code.customer
            return None
    LoginCode.objects.filter(pk__in=[c.pk for c in candidates]).update(
        failed_attempts=F("failed_attempts") + 1
    )
    return None
