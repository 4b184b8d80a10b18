"""Sending an order's confirmation SMS, and the tracker's callbacks for its delivery.

Each confirmation is tracked with::

    track_message.delay(
        message_id,
        on_delivered=mark_notified.s(order.pk),
        on_failed=schedule_retry.s(order.pk),
    )

The tracker fires one of them once, with its result dict as the first argument. A
callback may still run twice (a worker that dies after running it and before
acknowledging it): both are idempotent.
"""

import logging
from datetime import timedelta
from typing import Any

from celery import Task, shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from orders.models import Order, OrderEvent
from shop.sms import send_sms
from smsbat_tracker import SmsbatError, track_message

__all__ = ["mark_notified", "resend_confirmation", "schedule_retry", "send_confirmation"]

log = logging.getLogger(__name__)


def send_confirmation(order_pk: int, attempt: int) -> None:
    """Send attempt ``attempt`` (1, 2, ...) of the order's confirmation and track it.

    The attempt is claimed on the row first, so that it goes out at most once whoever
    runs it, and not at all once the order is notified or given up.
    """
    claimed = Order.objects.filter(
        pk=order_pk,
        confirmation_attempts=attempt - 1,
        notified_at__isnull=True,
        confirmation_failed_at__isnull=True,
    ).update(confirmation_attempts=attempt, confirmation_retry_at=None)
    if not claimed:
        return
    order = Order.objects.get(pk=order_pk)
    text = f"{settings.SHOP_NAME}: your order #{order.pk} is confirmed, total {order.total}."
    try:
        message_id = send_sms(order.phone, text)
    except SmsbatError as exc:
        log.warning("order %s: confirmation not sent (%s)", order.pk, type(exc).__name__)
        decision = _next_attempt(order.pk, attempt)
        OrderEvent.objects.create(
            order=order,
            kind=OrderEvent.Kind.SEND_FAILED,
            detail=f"{type(exc).__name__}; {decision}",
        )
        return
    Order.objects.filter(pk=order.pk).update(confirmation_message_id=message_id)
    OrderEvent.objects.create(
        order=order, kind=OrderEvent.Kind.SENT, message_id=message_id, detail=f"attempt {attempt}"
    )
    track_message.delay(
        message_id,
        on_delivered=mark_notified.s(order.pk),
        on_failed=schedule_retry.s(order.pk),
    )
    log.info("order %s: confirmation sent (attempt %s, message %s)", order.pk, attempt, message_id)


@shared_task(acks_late=True)
def resend_confirmation(order_pk: int, attempt: int) -> None:
    """Send the confirmation again (scheduled by :func:`schedule_retry`)."""
    send_confirmation(order_pk, attempt)


@shared_task(bind=True, acks_late=True)
def mark_notified(self: Task[Any, Any], result: dict[str, Any], order_pk: int) -> None:
    """``on_delivered``: the customer has the confirmation; the order is notified."""
    with transaction.atomic():
        _, recorded = OrderEvent.objects.get_or_create(
            task_id=self.request.id,
            defaults={
                "order_id": order_pk,
                "kind": OrderEvent.Kind.DELIVERED,
                "message_id": result["message_id"],
            },
        )
        # An update, not an increment: marking it twice changes nothing.
        Order.objects.filter(pk=order_pk, notified_at__isnull=True).update(
            notified_at=timezone.now(), confirmation_retry_at=None
        )
    if recorded:
        log.info("order %s: confirmation delivered", order_pk)


@shared_task(bind=True, acks_late=True)
def schedule_retry(self: Task[Any, Any], result: dict[str, Any], order_pk: int) -> None:
    """``on_failed``: the confirmation was not delivered (``undeliverable``,
    ``permanenterror`` or ``error``); send it again later, or give up after the last
    attempt."""
    message_id = result["message_id"]
    order = Order.objects.get(pk=order_pk)
    if order.notified_at is not None or message_id != order.confirmation_message_id:
        return  # delivered meanwhile, or about an earlier attempt
    decision = _next_attempt(order_pk, order.confirmation_attempts)
    OrderEvent.objects.get_or_create(
        task_id=self.request.id,
        defaults={
            "order_id": order_pk,
            "kind": OrderEvent.Kind.NOT_DELIVERED,
            "message_id": message_id,
            "detail": f"{result['outcome']}; {decision}",
        },
    )


def _next_attempt(order_pk: int, attempt: int) -> str:
    """After attempt ``attempt`` failed: schedule the next one, or give up after the last.

    Returns what it decided, for the order's history. Safe to run twice for one attempt:
    the next attempt is claimed on the row when it is sent.
    """
    now = timezone.now()
    if attempt >= settings.SHOP_CONFIRMATION_ATTEMPTS:
        Order.objects.filter(
            pk=order_pk, notified_at__isnull=True, confirmation_failed_at__isnull=True
        ).update(confirmation_failed_at=now, confirmation_retry_at=None)
        log.warning("order %s: confirmation not delivered after %s attempts", order_pk, attempt)
        return f"gave up after {attempt} attempts"
    delay = settings.SHOP_CONFIRMATION_RETRY_DELAY * 2 ** (attempt - 1)
    Order.objects.filter(pk=order_pk, confirmation_attempts=attempt).update(
        confirmation_retry_at=now + timedelta(seconds=delay)
    )
    resend_confirmation.apply_async((order_pk, attempt + 1), countdown=delay)
    log.info("order %s: confirmation attempt %s in %g s", order_pk, attempt + 1, delay)
    return f"attempt {attempt + 1} in {delay:g} s"
