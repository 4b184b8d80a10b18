"""Sending an SMS through SMSBAT: one client per process, configured from SMSBAT_*."""

import functools

from django.conf import settings

from smsbat_tracker import SmsbatClient, SmsbatError, load_settings

__all__ = ["SmsNotAccepted", "client", "send_sms"]


class SmsNotAccepted(SmsbatError):
    """SMSBAT answered the send but did not accept the message (e.g. a bad number)."""


@functools.cache
def client() -> SmsbatClient:
    """This process's SMSBAT client (SMSBAT_API_KEY, SMSBAT_BASE_URL, ...): built on first
    use, so that a process that sends nothing needs no credentials."""
    return SmsbatClient.from_settings(load_settings())


def send_sms(to: str, text: str) -> str:
    """Send one SMS and return its SMSBAT message id.

    Raises :class:`~smsbat_tracker.SmsbatError` when the API fails, and
    :class:`SmsNotAccepted` when it refuses the message.
    """
    answer = client().send_messages(
        [{"from": settings.SHOP_SMS_SENDER, "to": to, "type": "sms", "text": text}]
    )
    if not answer.message_ids:
        raise SmsNotAccepted("SMSBAT did not accept the message")
    return answer.message_ids[0]
