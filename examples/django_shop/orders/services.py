"""Placing an order."""

import functools
from decimal import Decimal

from django.db import transaction

from orders.models import Order
from orders.tasks import send_confirmation

__all__ = ["place_order"]


def place_order(phone: str, total: Decimal) -> Order:
    """Create the order; once it is committed, send its confirmation SMS and track it.

    Called inside a transaction of the caller's, it sends nothing before that transaction
    commits, and nothing at all if it rolls back. A failure to send does not undo the
    order (``robust``): it is logged, and the order shows no confirmation sent.
    """
    with transaction.atomic():
        order = Order.objects.create(phone=phone, total=total)
        transaction.on_commit(functools.partial(send_confirmation, order.pk, 1), robust=True)
    return order
