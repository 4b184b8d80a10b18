"""What every tracker task shares: its base class, its log context, its publish stamp,
broker errors as Celery users catch them, the enqueue checks, and how a run retries."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
import structlog
from celery import Celery, Task
from celery.exceptions import Retry
from kombu.exceptions import OperationalError

from smsbat_tracker.celery.compat.retry import install, shown_as_reason
from smsbat_tracker.celery.names import DUE_INDEXED, PUBLISHED_AT
from smsbat_tracker.celery.tracker import Tracker, tracker_of
from smsbat_tracker.engine.broker import routed_queue
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.log import get_logger

__all__ = [
    "CALLBACK_ARGS",
    "AnyTask",
    "NextRun",
    "TrackerTask",
    "as_signature_dict",
    "broker_errors",
    "check_known",
    "engine_of",
    "rerun",
    "stamp",
]

log = get_logger(__name__)

# Redis going away under a run: a failover, a restart, a frozen server (the socket timeout).
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, OperationalError)

if TYPE_CHECKING:
    AnyTask = Task[Any, Any]
else:
    AnyTask = Task

# The per-outcome callbacks of track_message (and track_campaign), in argument order.
CALLBACK_ARGS = ("on_delivered", "on_failed", "on_timeout")


def as_signature_dict(name: str, value: Any) -> dict[str, Any] | None:
    """A callback argument as a signature dict; a ``TypeError`` for anything else."""
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("task"), str):
        return dict(value)
    raise TypeError(f"{name} must be a Celery signature (e.g. my_task.s(order_id)) or None")


def check_known(app: Celery, name: str, sig: dict[str, Any] | None) -> None:
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
            except REDIS_AWAY as exc:
                if self.name not in DUE_INDEXED:
                    raise
                # A fault the tracker heals: the run's tracking stays in the due index,
                # and the re-driver resumes it once Redis is back (nothing can be published
                # meanwhile). A retry with its reason, not a failure with a traceback.
                why = f"Redis away ({type(exc).__name__}); the re-driver resumes it"
                log.warning("task.redis_away", error=type(exc).__name__, detail=str(exc)[:200])
                raise shown_as_reason(Retry(None, NextRun(why), None)) from None


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


def engine_of(task: AnyTask) -> Engine:
    """The engine of the tracker of the app ``task`` is bound to."""
    return tracker_of(task.app).engine


def stamp(options: dict[str, Any]) -> None:
    """Stamp a due-indexed task's publish time: the re-driver tells a task waiting behind
    a backlog from a lost one by it."""
    options["headers"] = {**(options.get("headers") or {}), PUBLISHED_AT: time.time()}


@contextlib.contextmanager
def broker_errors(what: str) -> Iterator[None]:
    """Redis errors at enqueue as the error Celery users catch: kombu's OperationalError."""
    try:
        yield
    except redis.RedisError as exc:
        raise OperationalError(f"{what}: Redis unavailable ({type(exc).__name__})") from exc


class NextRun(Exception):
    """Why a tracker task runs again: the reason its retry shows in Flower and the logs,
    e.g. ``NextRun('processing; next check in 8.0 s')``."""


def rerun(task: AnyTask, **options: Any) -> Retry:
    """``task.retry(**options)`` (the next run is published), shown as its reason (the
    ``exc`` option, a :class:`NextRun`): see :mod:`smsbat_tracker.celery.compat.retry`."""
    install()  # before the next run is published: an unknown Celery stops here, not after
    return shown_as_reason(task.retry(throw=False, **options))
