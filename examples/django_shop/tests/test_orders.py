"""Orders end to end: the view, ``transaction.on_commit``, the send through SMSBAT (the
fake API), the tracker in a real worker, and the callbacks' writes to the SQLite file."""

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from django.test import Client

from orders.models import Order
from orders.services import place_order
from smsbat_tracker.testing import FakeSmsbat


def history(order: Order) -> list[tuple[str, str, str]]:
    """The order's confirmation events: kind, SMSBAT message id, detail."""
    return list(order.events.values_list("kind", "message_id", "detail"))


def test_delivered_confirmation_marks_the_order_notified_once(
    smsbat_api: FakeSmsbat, eventually: Callable[..., Any], phone: str
) -> None:
    """An order placed through the API sends one confirmation SMS when it commits; its
    delivery (``on_delivered``) marks the row notified, once."""
    smsbat_api.set_send_outcome("delivered", after=0.5)

    response = Client().post(
        "/orders/", {"phone": phone, "total": "12.50"}, content_type="application/json"
    )

    assert response.status_code == 201
    body = response.json()
    assert body["confirmation_attempts"] == 1
    assert body["notified_at"] is None
    order = Order.objects.get(pk=body["id"])
    message_id = order.confirmation_message_id
    assert smsbat_api.truth(message_id)["final_status"] == "delivered"
    eventually(lambda: Order.objects.get(pk=order.pk).notified_at, what="the order notified")
    assert history(order) == [("sent", message_id, "attempt 1"), ("delivered", message_id, "")]
    assert smsbat_api.stats()["send_requests"] == 1
    shown = Client().get(f"/orders/{order.pk}/").json()
    assert shown["notified_at"] is not None
    assert shown["confirmation_failed_at"] is None


def test_undeliverable_confirmation_schedules_a_retry(
    smsbat_api: FakeSmsbat, eventually: Callable[..., Any], phone: str
) -> None:
    """An undeliverable confirmation (``on_failed``) schedules a retry on the row; the
    retry sends a new SMS, tracked again, whose delivery marks the order notified."""
    smsbat_api.set_send_outcome("undeliverable", after=0.3)
    order = place_order(phone, Decimal("30.00"))
    order.refresh_from_db()
    first = order.confirmation_message_id
    assert first
    assert order.confirmation_attempts == 1
    smsbat_api.set_send_outcome("delivered", after=0.3)  # the next send gets through

    eventually(lambda: Order.objects.get(pk=order.pk).notified_at, what="the order notified")

    order.refresh_from_db()
    second = order.confirmation_message_id
    assert order.confirmation_attempts == 2
    assert second != first
    assert smsbat_api.truth(first)["final_status"] == "undeliverable"
    assert history(order) == [
        ("sent", first, "attempt 1"),
        ("not_delivered", first, "undeliverable; attempt 2 in 1 s"),
        ("sent", second, "attempt 2"),
        ("delivered", second, ""),
    ]
    assert smsbat_api.stats()["send_requests"] == 2


def test_confirmation_gives_up_after_the_last_attempt(
    smsbat_api: FakeSmsbat, eventually: Callable[..., Any], phone: str
) -> None:
    """A confirmation that is never delivered is sent SHOP_CONFIRMATION_ATTEMPTS times
    (2 here), then the order is marked as failed and not notified."""
    smsbat_api.set_send_outcome("undeliverable", after=0.3)
    order = place_order(phone, Decimal("5.00"))

    # schedule_retry marks the row failed, then records why: wait for the record, its last
    # write.
    eventually(
        lambda: order.events.filter(detail__contains="gave up").exists(),
        what="the order given up",
    )

    order.refresh_from_db()
    assert order.notified_at is None
    assert order.confirmation_attempts == 2
    assert [(kind, detail) for kind, _, detail in history(order)] == [
        ("sent", "attempt 1"),
        ("not_delivered", "undeliverable; attempt 2 in 1 s"),
        ("sent", "attempt 2"),
        ("not_delivered", "undeliverable; gave up after 2 attempts"),
    ]
    assert smsbat_api.stats()["send_requests"] == 2


class PaymentDeclined(Exception):
    pass


def checkout(phone: str) -> None:
    """The caller's transaction: the order is placed, then the payment fails."""
    with transaction.atomic():
        place_order(phone, Decimal("9.99"))
        raise PaymentDeclined


def test_order_in_a_rolled_back_transaction_sends_nothing(
    smsbat_api: FakeSmsbat, eventually: Callable[..., Any], phone: str
) -> None:
    """Placed inside the caller's transaction, an order sends its confirmation only when
    that transaction commits: nothing before, and nothing at all when it rolls back."""
    with pytest.raises(PaymentDeclined):
        checkout(phone)

    assert not Order.objects.filter(phone=phone).exists()
    assert smsbat_api.stats()["send_requests"] == 0

    with transaction.atomic():
        order = place_order(phone, Decimal("9.99"))
        assert smsbat_api.stats()["send_requests"] == 0  # not before the commit
    assert smsbat_api.stats()["send_requests"] == 1
    # Its tracking ends within this test.
    eventually(lambda: Order.objects.get(pk=order.pk).notified_at, what="the order notified")


def test_invalid_order_is_refused_and_sends_nothing(smsbat_api: FakeSmsbat) -> None:
    """The API refuses an order with a number SMSBAT would not take, and sends nothing."""
    response = Client().post(
        "/orders/", {"phone": "0501234567", "total": "12.50"}, content_type="application/json"
    )

    assert response.status_code == 400
    assert "phone" in response.json()["errors"]
    assert smsbat_api.stats()["send_requests"] == 0
