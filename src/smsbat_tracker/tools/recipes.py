"""Ready-made follow-up tasks for the README's recipes and the demo.

Each one is an ordinary Celery task taking the tracking result dict first, as every
callback does. They keep their effects in Redis (under the key prefix) so that the demo,
the tests and the benchmarks can see what happened; a real application replaces them with
its own tasks (mark the order in its database, call its e-mail service): see the Django
shop in ``examples/django_shop``. A worker registers them only when asked to
(``--include smsbat_tracker.tools.recipes``, or importing this module).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis
from celery import Task, shared_task

from smsbat_tracker.celery.tracker import Tracker, tracker_of
from smsbat_tracker.provider.models import OutgoingMessage

if TYPE_CHECKING:
    AnyTask = Task[Any, Any]
else:
    AnyTask = Task

__all__ = [
    "mark_order_notified",
    "record_outcome",
    "recorded_key",
    "schedule_retry",
    "send_email_otp",
    "send_message",
]


def recorded_key(tracker: Tracker | Any, label: str = "default") -> str:
    """The Redis list :func:`record_outcome` appends to."""
    return f"{tracker.settings.key_prefix}:recorded:{label}"


def _record(task: AnyTask, label: str, entry: dict[str, Any]) -> None:
    tracker = tracker_of(task.app)
    entry = {
        **entry,
        "recorded_at": time.time(),
        "task": task.name,
        "task_id": task.request.id,
        # Which worker ran it (a prefork child's parent is the worker): the benchmarks
        # tell a run twice by a woken worker from one whose worker died before its ack.
        "pids": [os.getpid(), os.getppid()],
        # This run: the write below is retried after a lost connection, and may land
        # twice (Redis ran the first, then died before replying); one run, not two.
        "run": uuid.uuid4().hex,
    }
    # A callback should ride out a short outage of what it writes to (here Redis itself,
    # restarting): try again for a while rather than fail the one run it gets.
    give_up = time.monotonic() + _OUTAGE_PATIENCE
    while True:
        try:
            tracker.engine.redis.rpush(recorded_key(tracker, label), json.dumps(entry))
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.5)


# How long a recipe keeps trying to write its record while Redis is away.
_OUTAGE_PATIENCE = 30.0


@shared_task(bind=True, name="smsbat_tracker.recipes.record_outcome")
def record_outcome(self: AnyTask, result: dict[str, Any], label: str = "default") -> dict[str, Any]:
    """Append the result to a Redis list (demo, tests, benchmarks)."""
    _record(self, label, {"result": result})
    return result


@shared_task(bind=True, name="smsbat_tracker.recipes.mark_order_notified")
def mark_order_notified(self: AnyTask, result: dict[str, Any], order_id: str) -> str:
    """Order confirmation delivered: mark the order "notification sent"."""
    _record(self, "orders", {"order_id": order_id, "action": "notified", "result": result})
    return order_id


@shared_task(bind=True, name="smsbat_tracker.recipes.schedule_retry")
def schedule_retry(self: AnyTask, result: dict[str, Any], order_id: str) -> str:
    """Order confirmation failed: schedule a new attempt (here: record that one is due)."""
    _record(self, "orders", {"order_id": order_id, "action": "retry", "result": result})
    return order_id


@shared_task(bind=True, name="smsbat_tracker.recipes.send_email_otp")
def send_email_otp(self: AnyTask, result: dict[str, Any], email: str) -> str:
    """Two-factor code not delivered in time: send it by e-mail (here: record it)."""
    _record(self, "otp", {"email": email, "action": "email", "result": result})
    return email


@shared_task(bind=True, name="smsbat_tracker.recipes.send_message")
def send_message(self: AnyTask, to: str, text: str, sender: str, type: str = "sms") -> str:
    """Send one message and return its id: chain it into ``track_message``.

    ``send_message.s(to, text, sender) | track_message.s(on_delivered=...)``
    """
    tracker = tracker_of(self.app)
    message = OutgoingMessage.model_validate({"from": sender, "to": to, "type": type, "text": text})
    sent = tracker.engine.require_api().send_messages([message])
    if not sent.message_ids:
        status = sent.messages[0].status if sent.messages else "no answer"
        raise ValueError(f"SMSBAT did not accept the message ({status})")
    return sent.message_ids[0]
