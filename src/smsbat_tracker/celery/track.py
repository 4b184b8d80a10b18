"""Celery tasks of one message: :func:`track_message`, its settle, and its status.

.. code-block:: python

    track_message.delay(message_id, deadline=120,
        on_delivered=mark_order_notified.s(order_id),
        on_failed=schedule_retry.s(order_id),
        on_timeout=send_email_otp.s(email))

One call tracks one message: the first check comes ``SMSBAT_FIRST_DELAY`` seconds after the
enqueue, later ones back off exponentially, and the last wait lands on the deadline. When
the message reaches a final state (or the deadline passes) exactly one of the callbacks is
applied with the result dict as its first argument, and the task returns the same dict.

A second ``track_message`` for a message that is already tracked *joins* the running
session instead of polling again: its callbacks (and chain) are kept and fired with the
session's outcome; an identical second call (same callbacks) is the same subscription and
fires nothing more. The session's deadline is the first call's.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any, cast

import redis
from celery import Celery, current_app, shared_task
from celery.utils import uuid

from smsbat_tracker.celery.names import DUE_AT, SETTLE_TASK, TRACK_TASK
from smsbat_tracker.celery.task_base import (
    CALLBACK_ARGS,
    AnyTask,
    NextRun,
    TrackerTask,
    as_signature_dict,
    broker_errors,
    check_known,
    engine_of,
    rerun,
    stamp,
)
from smsbat_tracker.celery.tracker import tracker_of
from smsbat_tracker.engine.run import RunRequest, run_check, settle_from_cache
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import MessageStatus, validate_message_id
from smsbat_tracker.rules.decide import first_check_at

__all__ = ["get_status", "settle_from_cache", "settle_message", "track_message"]

log = get_logger(__name__)


class TrackTask(TrackerTask):
    """``track_message``'s enqueue: checks the arguments and registers the tracking.

    Bad input never reaches Redis. A new tracking's session and callbacks are stored
    before the task is published, so a push that arrives before the first check already
    ends it at once; the first run is the first check, ``SMSBAT_FIRST_DELAY`` later (at
    once when a push already told the final status).
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        message_id = kwargs.get("message_id", args[0] if args else None)
        validate_message_id(message_id)
        deadline = kwargs.get("deadline", args[1] if len(args) > 1 else None)
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0
        ):
            raise ValueError("deadline must be a positive number of seconds")
        on_delivered, on_failed, on_timeout = (
            as_signature_dict(name, kwargs.get(name, args[i] if len(args) > i else None))
            for i, name in enumerate(CALLBACK_ARGS, start=2)
        )
        stamp(options)
        if "enqueued_at" in kwargs:  # a retry, or a redelivery: registered already
            return super().apply_async(args, kwargs, *rest, **options)
        for name, sig in zip(CALLBACK_ARGS, (on_delivered, on_failed, on_timeout), strict=True):
            check_known(self.app, name, sig)

        tracker = self.tracker
        engine = tracker.engine
        now = time.time()
        kwargs["enqueued_at"] = now  # the deadline counts from here; marks it registered
        task_id = options.setdefault("task_id", uuid())
        sub = Subscription(on_delivered=on_delivered, on_failed=on_failed, on_timeout=on_timeout)
        deadline_at = now + (deadline if deadline is not None else tracker.settings.deadline)
        with broker_errors("track_message"):
            session, added, cached, ended = engine.register(
                message_id,
                sub,
                owner=task_id,
                started_at=now,
                deadline_at=deadline_at,
                first_at=first_check_at(engine.rules, now=now, deadline_at=deadline_at),
            )
        if not sub.is_empty and not added:
            log.info("track.duplicate", message_id=message_id, subscription=sub.id)
        if "countdown" not in options and "eta" not in options:
            final = ended or (cached is not None and cached.is_final)
            first_at = first_check_at(
                engine.rules, now=now, deadline_at=session.deadline_at, final=final
            )
            options["countdown"] = max(0.0, first_at - now)
        try:
            result = super().apply_async(args, kwargs, *rest, **options)
        except BaseException:
            # Not published: undo the registration, or a later call would join a session
            # that nobody runs.
            try:
                engine.abandon(message_id, owner=task_id, subscription=sub.id if added else None)
            except redis.RedisError as exc:  # the due index re-drives the session nobody runs
                log.warning("track.abandon_failed", message_id=message_id, error=str(exc))
            raise
        log.info(
            "track.enqueued",
            message_id=message_id,
            task_id=task_id,
            task_name=self.name,
            deadline_at=session.deadline_at,
            joined=session.owner != task_id,
        )
        return result


def _take_chain(task: AnyTask) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """Take the rest of a chain and link callbacks off the request.

    The engine then runs them once, with the final result, through the same exactly-once
    path as the callbacks; Celery would otherwise run them after whichever execution of
    this task returns, including a joined duplicate that returns before the outcome.
    """
    request = task.request
    steps = cast("list[dict[str, Any]]", request.chain or [])
    chain: list[dict[str, Any]] | None = [dict(s) for s in steps] or None
    links: list[dict[str, Any]] | None = [dict(s) for s in request.callbacks or ()] or None
    request.chain = None
    request.callbacks = None
    return chain, links


@shared_task(bind=True, base=TrackTask, name=TRACK_TASK, max_retries=None)
def track_message(
    self: AnyTask,
    message_id: str,
    deadline: float | None = None,
    on_delivered: dict[str, Any] | None = None,
    on_failed: dict[str, Any] | None = None,
    on_timeout: dict[str, Any] | None = None,
    enqueued_at: float | None = None,
) -> dict[str, Any]:
    """Track one message to its final state or the deadline; see the module docstring.

    The check itself is :func:`~smsbat_tracker.engine.run.run_check`; the task adds what
    only Celery knows (the request's chain and links, its ETA, its retry number) and turns
    the run's outcome into a return value or its next run.
    """
    validate_message_id(message_id)
    engine = engine_of(self)
    now = time.time()
    task_id = str(self.request.id)
    run = int(self.request.retries or 0)
    if not run:
        # The enqueue registered the callbacks, unless the task was sent by name
        # (send_task) or run eagerly: then they are registered here. A chain or link is
        # only known here, in the request.
        chain, links = _take_chain(self)
        registered = enqueued_at is not None
        sub = Subscription(
            on_delivered=None if registered else as_signature_dict("on_delivered", on_delivered),
            on_failed=None if registered else as_signature_dict("on_failed", on_failed),
            on_timeout=None if registered else as_signature_dict("on_timeout", on_timeout),
            chain=chain,
            links=links,
        )
        if not sub.is_empty and not engine.subscribe(message_id, sub):
            log.info("track.duplicate", message_id=message_id, subscription=sub.id)
    started = enqueued_at if enqueued_at is not None else now
    outcome = run_check(
        engine,
        RunRequest(
            message_id,
            owner=task_id,
            run=run,
            started_at=started,
            deadline_at=started + (deadline if deadline is not None else engine.settings.deadline),
            due_at=_due_at(self.request, now),
            now=now,
        ),
    )
    if outcome.wait is None:
        return outcome.result or {}
    raise rerun(self, countdown=outcome.wait, exc=NextRun(outcome.reason))


def _due_at(request: Any, now: float) -> float:
    """When this run fell due: its ETA (the countdown it was scheduled with), or the due
    time it was given back or re-driven with (:data:`DUE_AT`), else now."""
    eta = request.eta
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            return min(datetime.fromisoformat(eta).timestamp(), now)
    elif isinstance(eta, datetime):
        return min(eta.timestamp(), now)
    due = getattr(request, DUE_AT, None)
    if isinstance(due, int | float) and not isinstance(due, bool):
        return min(float(due), now)
    return now


@shared_task(bind=True, base=TrackerTask, name=SETTLE_TASK)
def settle_message(self: AnyTask, message_id: str) -> dict[str, Any] | None:
    """Finish a tracked message from its cached final status (for code that stores pushes).

    A no-op when nobody tracks the message yet: ``track_message`` finds the cached final
    status on its first run and finishes at once.
    """
    validate_message_id(message_id)
    return settle_from_cache(engine_of(self), message_id, claimer=str(self.request.id))


def get_status(message_id: str, *, app: Celery | None = None) -> MessageStatus:
    """A message's status, read through the Redis cache (30 s while in flight).

    ``app``: the Celery app whose tracker to use (default: the current app). Raises
    :class:`~smsbat_tracker.errors.InvalidMessageId` before any request for a bad id, and
    the client's errors when the API fails.
    """
    return tracker_of(app or current_app).engine.get_status(message_id)
