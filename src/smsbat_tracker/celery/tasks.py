"""Celery tasks: :func:`track_message` and the helpers users code against.

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
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import redis
import structlog
from celery import Celery, Task, current_app, shared_task
from celery.exceptions import Retry
from celery.utils import uuid
from kombu.exceptions import OperationalError

from smsbat_tracker import metrics
from smsbat_tracker.celery.names import (
    PUBLISHED_AT,
    SETTLE_TASK,
    TICK_TASK,
    TRACK_CAMPAIGN_TASK,
    TRACK_TASK,
)
from smsbat_tracker.celery.tracker import Tracker, tracker_of
from smsbat_tracker.engine.campaign import validate_campaign_id
from smsbat_tracker.engine.tracking import (
    Check,
    Engine,
    Session,
    Subscription,
    build_result,
    routed_queue,
)
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

__all__ = [
    "campaign_tick",
    "get_campaign_report",
    "get_status",
    "settle_message",
    "track_campaign",
    "track_message",
]

if TYPE_CHECKING:
    AnyTask = Task[Any, Any]
else:
    AnyTask = Task

log = get_logger(__name__)

_CALLBACK_ARGS = ("on_delivered", "on_failed", "on_timeout")
# A campaign tick works through due batches for this long before handing over: short,
# so that a worker killed mid-tick loses little.
_TICK_BUDGET = 2.0


def _as_signature_dict(name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("task"), str):
        return dict(value)
    raise TypeError(f"{name} must be a Celery signature (e.g. my_task.s(order_id)) or None")


def _check_known(app: Celery, name: str, sig: dict[str, Any] | None) -> None:
    """Refuse a callback that this app's workers would discard as an unregistered task.

    The tracker's worker sends the callback through the app that tracks; a task name that
    app does not know, sent to a queue its workers consume, is dropped by them with an
    error line, and the follow-up never runs. A callback routed elsewhere (its own
    ``queue``, or a route of the app's) is for workers that know it: it passes.
    """
    if sig is None:
        return
    task = str(sig["task"])
    options = sig.get("options") or {}
    if options.get("queue") or options.get("exchange") or options.get("routing_key"):
        return
    if task in app.tasks:
        return
    if routed_queue(app, task)[0] != app.conf.task_default_queue:
        return  # routed to another queue by the app's routes
    where = f"Celery app {app.main!r}" if app.main else "the current Celery app"
    raise ValueError(
        f"{name}: task {task!r} is not registered on {where}, whose workers would discard it "
        "as unregistered: import its module where the app is created (or autodiscover it), "
        "or route it to the workers that know it (e.g. .set(queue=...))"
    )


class TrackerTask(AnyTask):
    """Base of the tracker's tasks: acknowledged after they ran, results not stored.

    A run binds its task and message to the log context (structlog's contextvars) for
    its own lines; a retry's traceback is cut to this frame (see :meth:`__call__`).
    """

    acks_late = True
    reject_on_worker_lost = True
    track_started = True
    # Outcomes travel by callbacks and chains, and Flower shows results from events;
    # opt in per call with ignore_result=False.
    ignore_result = True

    @property
    def tracker(self) -> Tracker:
        """The tracker of the app this task is bound to (``init_app``)."""
        return tracker_of(self.app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _task_context(self, args, kwargs):
            try:
                return super().__call__(*args, **kwargs)
            except Retry as retry:
                # A retry is how a check waits for the next one, and Celery copies the
                # traceback of each (every frame's code positions, formatted): cut to this
                # frame, that copy costs about 0.6 ms less per check.
                raise retry.with_traceback(None) from None


@contextlib.contextmanager
def _task_context(task: AnyTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
    context: dict[str, Any] = {"task_id": task.request.id, "task_name": task.name}
    message_id = kwargs.get("message_id")
    if message_id is None and args and isinstance(args[0], str):
        message_id = args[0]
    if message_id is not None:
        context["message_id"] = message_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()


def _stamp(options: dict[str, Any]) -> None:
    """Stamp a due-indexed task's publish time: the re-driver tells a task waiting behind
    a backlog from a lost one by it."""
    options["headers"] = {**(options.get("headers") or {}), PUBLISHED_AT: time.time()}


@contextlib.contextmanager
def _broker_errors(what: str) -> Iterator[None]:
    """Redis errors at enqueue as the error Celery users catch: kombu's OperationalError."""
    try:
        yield
    except redis.RedisError as exc:
        raise OperationalError(f"{what}: Redis unavailable ({type(exc).__name__})") from exc


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
            _as_signature_dict(name, kwargs.get(name, args[i] if len(args) > i else None))
            for i, name in enumerate(_CALLBACK_ARGS, start=2)
        )
        _stamp(options)
        if "enqueued_at" in kwargs:  # a retry, or a redelivery: registered already
            return super().apply_async(args, kwargs, *rest, **options)
        for name, sig in zip(_CALLBACK_ARGS, (on_delivered, on_failed, on_timeout), strict=True):
            _check_known(self.app, name, sig)

        tracker = self.tracker
        engine = tracker.engine
        now = time.time()
        kwargs["enqueued_at"] = now  # the deadline counts from here; marks it registered
        task_id = options.setdefault("task_id", uuid())
        sub = Subscription(on_delivered=on_delivered, on_failed=on_failed, on_timeout=on_timeout)
        deadline_at = now + (deadline if deadline is not None else tracker.settings.deadline)
        with _broker_errors("track_message"):
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


class _ShownRetry(Retry):
    """Celery's :class:`Retry`, shown as its reason.

    A thread-pool worker reports the ``Retry`` itself as a retry's exception (in the
    ``task-retried`` event Flower shows): ``Retry(Retry(...), NextRun('...'), 8.0)``. A
    prefork one reports its ``exc``. This repr makes both ``NextRun('...')``.
    """

    def __repr__(self) -> str:
        return repr(self.exc) if self.exc is not None else super().__repr__()


def _retry(task: AnyTask, **options: Any) -> Retry:
    """``task.retry(**options)`` (the next run is published), shown as its reason."""
    retry = task.retry(throw=False, **options)
    retry.__class__ = _ShownRetry
    return retry


class NextRun(Exception):
    """Why a tracker task runs again: the reason its retry shows in Flower and the logs,
    e.g. ``NextRun('processing; next check in 8.0 s')``."""


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


def _engine(task: AnyTask) -> Engine:
    return tracker_of(task.app).engine


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
    engine = _engine(self)
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
            on_delivered=None if registered else _as_signature_dict("on_delivered", on_delivered),
            on_failed=None if registered else _as_signature_dict("on_failed", on_failed),
            on_timeout=None if registered else _as_signature_dict("on_timeout", on_timeout),
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
    if not _engine(task).reschedule(
        message_id,
        owner=str(task.request.id),
        run=run,
        next_at=time.time() + wait,
        counted=isinstance(decision, Wait) and decision.counted,
        failed=isinstance(decision, Wait) and decision.failed,
        check=check,
    ):
        return _superseded(message_id, session.owner)
    raise _retry(task, countdown=wait, exc=_reason(decision))


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
    return settle_from_cache(_engine(self), message_id, claimer=str(self.request.id))


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


class CampaignTask(TrackerTask):
    """``track_campaign``'s enqueue: checks the arguments and registers the campaign.

    Bad ids never reach the broker. Every message's first check, and each tick chain's
    entry in the due index, are stored before the task is published, so that a lost task
    (a killed worker, a Redis restart) is re-driven instead of forgotten.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        campaign_id = validate_campaign_id(kwargs.get("campaign_id", args[0] if args else None))
        message_ids = kwargs.get("message_ids", args[1] if len(args) > 1 else None)
        if not isinstance(message_ids, list | tuple) or not message_ids:
            raise ValueError("message_ids must be a non-empty list of message ids")
        for message_id in message_ids:
            validate_message_id(message_id)
        for name in ("on_report", *_CALLBACK_ARGS):
            sig = _as_signature_dict(name, kwargs.get(name))
            if "enqueued_at" not in kwargs:
                _check_known(self.app, name, sig)
        if "enqueued_at" not in kwargs:
            kwargs["enqueued_at"] = time.time()
            with _broker_errors("track_campaign"):
                _register_campaign(
                    self.tracker,
                    campaign_id,
                    message_ids,
                    deadline=kwargs.get("deadline", args[2] if len(args) > 2 else None),
                    on_report=kwargs.get("on_report"),
                    on_delivered=kwargs.get("on_delivered"),
                    on_failed=kwargs.get("on_failed"),
                    on_timeout=kwargs.get("on_timeout"),
                    enqueued_at=kwargs["enqueued_at"],
                )
        return super().apply_async(args, kwargs, *rest, **options)


def _register_campaign(
    tracker: Tracker,
    campaign_id: str,
    message_ids: Sequence[str],
    *,
    deadline: float | None,
    on_report: Any,
    on_delivered: Any,
    on_failed: Any,
    on_timeout: Any,
    enqueued_at: float,
) -> bool:
    return tracker.campaigns.register(
        campaign_id,
        message_ids,
        deadline=deadline,
        subscription=Subscription(
            on_delivered=_as_signature_dict("on_delivered", on_delivered),
            on_failed=_as_signature_dict("on_failed", on_failed),
            on_timeout=_as_signature_dict("on_timeout", on_timeout),
        ),
        on_report=_as_signature_dict("on_report", on_report),
        enqueued_at=enqueued_at,
    )


@shared_task(bind=True, base=CampaignTask, name=TRACK_CAMPAIGN_TASK)
def track_campaign(
    self: AnyTask,
    campaign_id: str,
    message_ids: list[str],
    deadline: float | None = None,
    on_report: dict[str, Any] | None = None,
    on_delivered: dict[str, Any] | None = None,
    on_failed: dict[str, Any] | None = None,
    on_timeout: dict[str, Any] | None = None,
    enqueued_at: float | None = None,
) -> dict[str, Any]:
    """Track many messages as one campaign and report its delivery rate.

    ``on_report`` receives the report when every message is final or the deadline has
    passed; the per-message callbacks are optional. The report stays retrievable with
    :func:`get_campaign_report`. See :mod:`smsbat_tracker.engine.campaign` for the design.
    """
    tracker = tracker_of(self.app)
    runner = tracker.campaigns
    enqueued_at = enqueued_at if enqueued_at is not None else time.time()
    # Registered at enqueue, unless sent by name, or cut short: then registered here.
    _register_campaign(
        tracker,
        campaign_id,
        message_ids,
        deadline=deadline,
        on_report=on_report,
        on_delivered=on_delivered,
        on_failed=on_failed,
        on_timeout=on_timeout,
        enqueued_at=enqueued_at,
    )
    meta = runner.meta(campaign_id)
    if meta.get("started_at") != repr(enqueued_at):
        log.info("campaign.duplicate", campaign_id=campaign_id)
        return {"campaign_id": campaign_id, "started": False}
    total = len(set(message_ids))
    metrics.get().campaigns_started.inc()
    metrics.get().campaign_messages.inc(total)
    first = enqueued_at + runner.settings.first_delay * (1 - runner.settings.jitter)
    for slot, run in runner.chains(campaign_id, meta).items():
        if run.endswith(":0"):  # a chain not started yet (a redelivery finds them started)
            campaign_tick.apply_async(
                (campaign_id,), {"slot": slot, "run": run}, countdown=first - time.time()
            )
    return {"campaign_id": campaign_id, "started": True, "total": total}


class TickTask(TrackerTask):
    """``campaign_tick``: each publish (the first, and every retry) is stamped."""

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        _stamp(options)
        return super().apply_async(args, kwargs, *rest, **options)


@shared_task(bind=True, base=TickTask, name=TICK_TASK, max_retries=None)
def campaign_tick(
    self: AnyTask, campaign_id: str, slot: int | None = None, run: str | None = None
) -> dict[str, Any]:
    """Check the campaign's due messages for a few seconds, then schedule the next tick.

    Each tick holds one batch at a time and runs again as a retry of itself (one task id
    per chain in Flower, not one per tick): at most ``SMSBAT_CAMPAIGN_TICKS`` chains per
    campaign exist, whatever its size. A chain's ``run`` is its fencing token: a tick
    whose chain was re-driven stops at once.
    """
    runner = tracker_of(self.app).campaigns
    fenced = slot is not None and run is not None
    if fenced and not runner.holds(campaign_id, cast(int, slot), cast(str, run)):
        log.info("campaign.tick_superseded", campaign_id=campaign_id, slot=slot)
        return {"claimed": 0, "api_calls": 0, "recorded": 0, "superseded": True}
    until = time.monotonic() + _TICK_BUDGET
    claimed = calls = recorded = 0
    while True:
        result = runner.tick(campaign_id, slot, run)
        claimed += result.claimed
        calls += result.api_calls
        recorded += result.recorded
        if result.finished or result.next_in is None:
            break
        if result.next_in > 0 or time.monotonic() > until:
            reason = NextRun(
                f"{claimed} checked, {recorded} final; next tick in {result.next_in:.1f} s"
            )
            if not fenced:
                raise _retry(self, args=(campaign_id,), countdown=result.next_in, exc=reason)
            following = runner.next_run(
                campaign_id, cast(int, slot), cast(str, run), time.time() + result.next_in
            )
            if following is not None:
                raise _retry(
                    self,
                    args=(campaign_id,),
                    kwargs={"slot": slot, "run": following},
                    countdown=result.next_in,
                    exc=reason,
                )
            break
    return {"claimed": claimed, "api_calls": calls, "recorded": recorded}


def get_campaign_report(campaign_id: str, *, app: Celery | None = None) -> dict[str, Any] | None:
    """The campaign's final report, or its report so far while it runs (None if unknown).

    ``app``: the Celery app whose tracker to use (default: the current app).
    """
    runner = tracker_of(app or current_app).campaigns
    validate_campaign_id(campaign_id)
    return runner.stored_report(campaign_id) or (
        runner.report(campaign_id) if runner.meta(campaign_id) else None
    )
