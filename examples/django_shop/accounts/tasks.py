"""Sending a login code by SMS, and the tracker's callbacks: e-mail it if the SMS fails.

The SMS is tracked with::

    track_message.delay(
        message_id,
        deadline=settings.SHOP_LOGIN_CODE_SMS_DEADLINE,
        on_delivered=code_delivered.s(login_code.pk),
        on_failed=email_code.s(login_code.pk),
        on_timeout=email_code.s(login_code.pk),
    )

Only the row's id travels in task arguments; the code is never logged.
"""

import logging
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from accounts.models import LoginCode
from shop.sms import send_sms
from smsbat_tracker import SmsbatError, track_message

__all__ = ["code_delivered", "email_code", "send_login_code"]

log = logging.getLogger(__name__)


def send_login_code(login_code_pk: int) -> None:
    """Send the code by SMS and track it; e-mail it at once if the SMS cannot be sent."""
    login_code = LoginCode.objects.select_related("customer").get(pk=login_code_pk)
    text = f"{settings.SHOP_NAME}: your login code is {login_code.code()}"
    try:
        message_id = send_sms(login_code.customer.phone, text)
    except SmsbatError as exc:
        log.warning("login code %s: SMS not sent (%s)", login_code.pk, type(exc).__name__)
        email_code.delay({"message_id": None, "outcome": "not_sent"}, login_code.pk)
        return
    LoginCode.objects.filter(pk=login_code.pk).update(message_id=message_id)
    track_message.delay(
        message_id,
        deadline=settings.SHOP_LOGIN_CODE_SMS_DEADLINE,
        on_delivered=code_delivered.s(login_code.pk),
        on_failed=email_code.s(login_code.pk),
        on_timeout=email_code.s(login_code.pk),
    )
    log.info("login code %s: SMS sent (message %s)", login_code.pk, message_id)


@shared_task(acks_late=True)
def code_delivered(result: dict[str, Any], login_code_pk: int) -> None:
    """``on_delivered``: the SMS arrived; nothing more to send."""
    LoginCode.objects.filter(pk=login_code_pk).update(sms_outcome=result["outcome"])


@shared_task(acks_late=True)
def email_code(result: dict[str, Any], login_code_pk: int) -> None:
    """``on_failed`` and ``on_timeout``: the SMS did not arrive in time; e-mail the code.

    Nothing is sent for a code already used or expired, or already e-mailed. Run twice
    (a redelivery after the mail went out), it sends the same code again: harmless.
    """
    LoginCode.objects.filter(pk=login_code_pk).update(sms_outcome=result["outcome"])
    login_code = LoginCode.objects.select_related("customer").get(pk=login_code_pk)
    if (
        login_code.emailed_at is not None
        or login_code.used_at is not None
        or login_code.expires_at <= timezone.now()
    ):
        return
    minutes = max(1, round((login_code.expires_at - timezone.now()).total_seconds() / 60))
    send_mail(
        subject=f"Your {settings.SHOP_NAME} login code",
        message=(
            f"Your login code is {login_code.code()}\n\n"
            f"We sent it by SMS too, but the SMS has not arrived. "
            f"The code is valid for {minutes} more minutes."
        ),
        from_email=None,  # DEFAULT_FROM_EMAIL
        recipient_list=[login_code.customer.email],
    )
    LoginCode.objects.filter(pk=login_code_pk).update(emailed_at=timezone.now())
    log.info("login code %s: e-mailed (SMS outcome %s)", login_code_pk, result["outcome"])
