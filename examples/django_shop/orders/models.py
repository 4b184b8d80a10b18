"""An order, and the history of its confirmation SMS."""

from typing import Any

from django.db import models


class Order(models.Model):
    """A placed order. Its confirmation goes out by SMS once the order is committed."""

    phone = models.CharField(max_length=16)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)
    # The confirmation: how many times it was sent, the SMSBAT id of the latest send,
    # when the next send is due, and how it ended (delivered, or given up).
    confirmation_attempts = models.PositiveSmallIntegerField(default=0)
    confirmation_message_id = models.CharField(max_length=64, blank=True)
    confirmation_retry_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)
    confirmation_failed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"order #{self.pk}"

    def as_dict(self) -> dict[str, Any]:
        """The order as the JSON API shows it."""
        return {
            "id": self.pk,
            "phone": self.phone,
            "total": str(self.total),
            "confirmation_attempts": self.confirmation_attempts,
            "confirmation_retry_at": _iso(self.confirmation_retry_at),
            "notified_at": _iso(self.notified_at),
            "confirmation_failed_at": _iso(self.confirmation_failed_at),
        }


class OrderEvent(models.Model):
    """One step of an order's confirmation, for its history."""

    class Kind(models.TextChoices):
        SENT = "sent"
        SEND_FAILED = "send_failed"
        DELIVERED = "delivered"
        NOT_DELIVERED = "not_delivered"
        RETRY_SCHEDULED = "retry_scheduled"
        GAVE_UP = "gave_up"

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    message_id = models.CharField(max_length=64, blank=True)
    detail = models.CharField(max_length=200, blank=True)
    # The Celery task that recorded the event, for events of tracker callbacks: the same
    # callback run again (a redelivery) has the same task id and records nothing twice.
    task_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("pk",)

    def __str__(self) -> str:
        return f"{self.kind} of order #{self.order_id}"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
