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

from smsbat_tracker import metrics
from smsbat_tracker.celery.names import SETTLE_TASK, TRACK_TASK
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
from smsbat_tracker.engine.check import Check
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import Session, Subscription, build_result
from smsbat_tracker.errors import SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import MessageStatus, validate_message_id
from smsbat_tracker.rules.decide import (
    Answer,
    Ask,
    AwaitPush,
    Finish,
    Progress,
    TryLater,
    Wait,
    decide,
    line_position,
)
from smsbat_tracker.store.ratelimit import pause_for

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
                first_at=min(now + tracker.settings.first_delay, deadline_at),
            )
        if not sub.is_empty and not added:
            log.info("track.duplicate", message_id=message_id, subscription=sub.id)
        if "countdown" not in options and "eta" not in options:
            final = ended or (cached is not None and cached.is_final)
            options["countdown"] = (
                0.0 if final else min(tracker.settings.first_delay, session.deadline_at - now)
            )
        try:
            result = super().apply_async(args, kwargs, *rest, **options)
        except BaseException:
            # Not published: undo the registration, or a later call would join a session
            # that nobody runs.
            with contextlib.suppress(redis.RedisError):
                engine.abandon(message_id, owner=task_id, subscription=sub.id if added else None)
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


def _reason(decision: Wait | AwaitPush) -> NextRun:
    """A retry's reason, from the decision that schedules it."""
    wait = f"{decision.seconds:.1f} s"
    if isinstance(decision, AwaitPush):
        return NextRun(f"awaiting the provider's push; next look in {wait}")
    if decision.failed:
        return NextRun(f"the request failed; retry in {wait}")
    if not decision.counted:
        return NextRun(f"no turn to ask the API yet; next try in {wait}")
    status = decision.status.deliverystatus if decision.status else "no status yet"
    return NextRun(f"{status}; next check in {wait}")


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
    """Track one message to its final state or the deadline; see the module docstring."""
    validate_message_id(message_id)
    engine = engine_of(self)
    settings = engine.settings
    now = time.time()
    task_id = str(self.request.id)
    run = int(self.request.retries or 0)
    first_run = not run

    if first_run:
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
    deadline_at = started + (deadline if deadline is not None else settings.deadline)
    # Round trip one: the session, the outcome, the cache, and a turn to ask the API.
    start = engine.start(
        message_id,
        owner=task_id,
        run=run,
        started_at=started,
        deadline_at=deadline_at,
        due_at=line_position(
            Progress(started, deadline_at), due_at=_due_at(self.request.eta, now), now=now
        ),
    )
    session, cached = start.session, start.cached
    if first_run and session.owner == task_id:
        metrics.get().started.inc()
    if start.recorded is not None:
        # Finished already (webhook, an earlier run, another session): claim what is ours.
        return engine.settle(message_id, None, claimer=task_id).result or start.recorded
    if start.turn is None:  # not the run the session expects
        if first_run and session.owner != task_id:
            log.info("track.joined", message_id=message_id, owner=session.owner)
            return {"message_id": message_id, "outcome": "joined", "owner": session.owner}
        return _superseded(message_id, session.owner)

    progress = session.progress
    decision = decide(progress, cached=cached, now=now, rules=engine.rules)
    answer: Answer | None = None
    if isinstance(decision, Ask):
        try:
            answer = engine.ask(message_id, start.turn)
        except (TryLater, SmsbatError) as exc:
            answer = exc
            if isinstance(exc, SmsbatError):
                log.warning("track.api_error", message_id=message_id, error=str(exc))
        decision = decide(
            progress, cached=cached, now=time.time(), rules=engine.rules, answer=answer
        )
    assert not isinstance(decision, Ask)  # an answer is never followed by another ask
    asked = answer is not None and not isinstance(answer, TryLater)
    # Round trip two writes what this run learned, with its next step.
    check = Check(
        answer=answer if isinstance(answer, MessageStatus) else None,
        asked=asked,
        unused_turn=start.turn.taken and answer is None,
        pushed=isinstance(decision, AwaitPush) and not session.pushed,
        pause=pause_for(answer),
    )
    if isinstance(decision, AwaitPush):
        # The provider pushes this message's changes; the webhook will end tracking.
        log.info("track.awaiting_push", message_id=message_id, next_in=round(decision.seconds, 3))
        return _next_run(self, session, run, decision, check)
    status = decision.status
    if isinstance(decision, Wait) and decision.failed:
        log.info("track.retry", message_id=message_id, next_in=round(decision.seconds, 3))
    elif asked or (isinstance(decision, Wait) and decision.counted):
        log.info(
            "track.check",
            message_id=message_id,
            deliverystatus=status.deliverystatus if status else None,
            source="api" if asked else "cache",
            attempt=session.checks + 1,
            next_in=round(decision.seconds, 3) if isinstance(decision, Wait) else None,
        )
    if isinstance(decision, Finish):
        if isinstance(answer, MessageStatus):
            source: str | None = "poll"
        else:
            source = cached.source if cached is not None and status is cached.status else None
        result = build_result(
            message_id,
            decision.outcome,
            status=status,
            source=source,
            started_at=session.started_at,
            polls=session.polls + (1 if asked else 0),
            error=decision.error,
        )
        return engine.settle(message_id, result, claimer=task_id, check=check).result
    return _next_run(self, session, run, decision, check)


def _next_run(
    task: AnyTask, session: Session, run: int, decision: Wait | AwaitPush, check: Check
) -> dict[str, Any]:
    """Schedule the next run as ``decision`` says; fenced: a superseded run stops instead."""
    message_id = session.message_id
    wait = decision.seconds
    if not engine_of(task).reschedule(
        message_id,
        owner=str(task.request.id),
        run=run,
        next_at=time.time() + wait,
        counted=isinstance(decision, Wait) and decision.counted,
        failed=isinstance(decision, Wait) and decision.failed,
        check=check,
    ):
        return _superseded(message_id, session.owner)
    raise rerun(task, countdown=wait, exc=_reason(decision))


def _due_at(eta: Any, now: float) -> float:
    """When this run fell due: its ETA (the countdown it was scheduled with), else now."""
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            return min(datetime.fromisoformat(eta).timestamp(), now)
    elif isinstance(eta, datetime):
        return min(eta.timestamp(), now)
    return now


def _superseded(message_id: str, owner: str) -> dict[str, Any]:
    """A run whose tracking was taken over (re-driven) or that is a stale copy: it stops."""
    log.info("track.superseded", message_id=message_id, owner=owner)
    return {"message_id": message_id, "outcome": "superseded", "owner": owner}


@shared_task(bind=True, base=TrackerTask, name=SETTLE_TASK)
def settle_message(self: AnyTask, message_id: str) -> dict[str, Any] | None:
    """Finish a tracked message from its cached final status (for code that stores pushes).

    A no-op when nobody tracks the message yet: ``track_message`` finds the cached final
    status on its first run and finishes at once.
    """
    validate_message_id(message_id)
    return settle_from_cache(engine_of(self), message_id, claimer=str(self.request.id))


def settle_from_cache(engine: Engine, message_id: str, *, claimer: str) -> dict[str, Any] | None:
    """End a tracked message whose cached status is final; None when there is nothing to end.

    The webhook receiver calls this in its own process, one queue hop sooner than
    ``settle_message``; both go through the engine's exactly-once settle.
    """
    cached = engine.cache.get(message_id)
    session = engine.session(message_id)
    if session is None and cached is not None and cached.is_final:
        # A push after the tracking ended (a duplicate): the settle finds the outcome and
        # cuts what the message keeps back to it (the push's cache entry included).
        engine.settle(message_id, None, claimer=claimer)
        return None
    if cached is None or not cached.is_final or session is None:
        return None
    progress = session.progress
    decision = decide(progress, cached=cached, now=time.time(), rules=engine.rules)
    if not isinstance(decision, Finish):
        return None
    result = build_result(
        message_id,
        decision.outcome,
        status=decision.status,
        source=cached.source,
        started_at=session.started_at,
        polls=session.polls,
    )
    return engine.settle(message_id, result, claimer=claimer).result


def get_status(message_id: str, *, app: Celery | None = None) -> MessageStatus:
    """A message's status, read through the Redis cache (30 s while in flight).

    ``app``: the Celery app whose tracker to use (default: the current app). Raises
    :class:`~smsbat_tracker.errors.InvalidMessageId` before any request for a bad id, and
    the client's errors when the API fails.
    """
    return tracker_of(app or current_app).engine.get_status(message_id)
