"""The package's own Celery app: ``celery -A smsbat_tracker.worker worker`` starts a worker.

For users who have no Celery app of their own; a project that has one calls
:func:`smsbat_tracker.init_app` on it instead. Importing this module builds the app from
the environment; its worker logs JSON lines through the project's redacting logging.

Redis is the broker, the result backend and the status cache. The settings that make
countdown retries safe on Redis are set here, explicitly:

- ``visibility_timeout`` (``SMSBAT_VISIBILITY_TIMEOUT``, 1 h) far above every countdown
  (the settings refuse a ``SMSBAT_MAX_DELAY`` above a quarter of it): a waiting countdown
  task is held unacked, and one that outlived the timeout would run twice;
- ``acks_late`` with ``reject_on_worker_lost``: a prefork child killed mid-task has its
  message requeued at once by its parent;
- the re-driver (:mod:`smsbat_tracker.celery.redrive`), a bootstep of every worker of an app
  that runs the tracker (:func:`smsbat_tracker.init_app`, which this app calls too):
  what a whole worker held when it died, or what a Redis restart dropped, resumes
  within about two seconds (a frozen worker's: ``SMSBAT_REDRIVE_AFTER``) instead of the
  visibility timeout;
- JSON only, task events on (Flower), and the deadline is tracked by the task itself,
  never by Celery's ``expires``.
"""

from __future__ import annotations

import logging
import sys
from functools import cached_property
from typing import Any, Final

from celery import Celery, signals

from smsbat_tracker.celery.integration import configure, init_app
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.engine.campaign import CampaignRunner
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import configure_logging
from smsbat_tracker.redis_url import is_sentinel_url
from smsbat_tracker.store.connections import SOCKET_TIMEOUT, socket_options

__all__ = ["CELERY_TASK_LOGGERS", "TrackerApp", "app", "create_app"]

# Celery's loggers of its per-task lines: "received" (the consumer's strategy), "succeeded"
# and "retry" (the tracer). Quiet unless SMSBAT_TASK_LOG_LINES.
CELERY_TASK_LOGGERS: Final = ("celery.worker.strategy", "celery.app.trace")
# Celery's consumer logs each attempt to reach the broker again at ERROR, "Trying again" or
# "Will retry": a fault it heals, so a WARNING in the package's worker (an alert on ERROR
# must not page on every failover). Giving up is another line, and stays an error.
CONSUMER_LOGGER: Final = "celery.worker.consumer.consumer"


class _RetriedConnectionAsWarning(logging.Filter):
    """Celery's "consumer: Cannot connect ..." line, logged as a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(
            "consumer: Cannot connect"
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class TrackerApp(Celery):
    """The package's own Celery app: a Celery app that runs the tracker (``init_app``),
    with the tracker's :class:`Settings`, engine and campaign runner at hand."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conf.update(celery_config(settings))
        self.tracker: Tracker = init_app(self, settings)

    @cached_property
    def Worker(self) -> Any:
        """The worker class: Celery's, with its banner as one JSON line off a terminal
        (:mod:`smsbat_tracker.celery.banner`)."""
        from smsbat_tracker.celery.banner import Worker

        return self.subclass_with_self(Worker)

    @property
    def settings(self) -> Settings:
        """The tracker's settings."""
        return self.tracker.settings

    @property
    def engine(self) -> Engine:
        """This process's engine; built on first use and again after a fork."""
        return self.tracker.engine

    @property
    def campaigns(self) -> CampaignRunner:
        """This process's campaign runner (shares the engine's connections)."""
        return self.tracker.campaigns

    def warm(self) -> None:
        """See :meth:`Tracker.warm <smsbat_tracker.celery.tracker.Tracker.warm>`."""
        self.tracker.warm()

    def reconfigure(self, settings: Settings) -> None:
        """Use other settings from now on (tests, embedding applications, the demo).

        Call before a worker starts. Celery's broker connections are dropped, so that the
        next publish goes to the new ``REDIS_URL``.
        """
        self.tracker.use(settings)
        self.conf.update(celery_config(settings))
        configure(self, settings)
        # kombu keeps its pools per broker URL: forgetting ours makes the next publish
        # take (or build) the pool of the new one.
        self._pool = None
        self.amqp._producer_pool = None  # type: ignore[attr-defined]

    def serve_metrics(self) -> None:
        """See :meth:`smsbat_tracker.celery.tracker.Tracker.serve_metrics`."""
        self.tracker.serve_metrics()

    def stop_metrics(self) -> None:
        """Stop serving metrics; remove the temporary directory the worker made."""
        self.tracker.stop_metrics()

    def close_engine(self) -> None:
        """Close this process's connections (tests, embedding applications)."""
        self.tracker.close()


def create_app(settings: Settings | None = None) -> TrackerApp:
    """Build the package's Celery app for ``settings`` (default: from the environment).

    Its worker registers the tracker's tasks only; the demo's recipe tasks are loaded
    when asked for (``--include smsbat_tracker.tools.recipes``).
    """
    settings = settings or load_settings(credentials=False)
    return TrackerApp(
        settings,
        "smsbat_tracker",
        include=["smsbat_tracker.celery.track", "smsbat_tracker.celery.campaigns"],
    )


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of the package's own app for ``settings``.

    The tracker's routes, queues and transport options are added by ``init_app``.
    """
    # kombu's SentinelChannel and Celery's SentinelBackend both read the master's name here.
    sentinel = (
        {"master_name": settings.sentinel_master} if is_sentinel_url(settings.redis_url) else {}
    )
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.unacked_restore_interval,
            "unacked_restore_throttle": 1,
            **socket_options(),
            **sentinel,
        },
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            **sentinel,
        },
        # Celery's default waits 120 s on a Redis that stopped answering.
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": SOCKET_TIMEOUT,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": int(settings.final_ttl),
        # Outcomes travel by callbacks and chains, and Flower shows results from events.
        # Storing every result would cost Redis memory and, in the sending process, a
        # pub/sub subscription per task; opt in per call with ignore_result=False.
        "task_ignore_result": True,
        # Callbacks, like the tracker's own tasks, are acknowledged after they ran.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
        "task_routes": None,
        "task_queues": None,
        # KiB, checked after each task; None: never replaced.
        "worker_max_memory_per_child": settings.worker_max_memory * 1024 or None,
    }


def _load() -> TrackerApp:
    try:
        return create_app()
    except ConfigError as exc:
        # Under the celery command (worker, flower, beat), stop start-up with the one clear
        # message instead of Celery's "unable to load" traceback; importers get the error.
        if "celery.bin.celery" in sys.modules:
            raise SystemExit(f"smsbat-tracker: {exc}") from None
        raise


app = _load()


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connected by this module, the package's own app: its worker's logging is ours. A
    # user's app that calls init_app keeps its own logging.
    settings = app.settings
    configure_logging(
        level=loglevel or "INFO",
        secrets=settings.secret_values,
    )
    if not settings.task_log_lines:
        # Celery's "received", "succeeded" and "retry" lines, about 1 KB each and several
        # per tracking: WARNING and up only (a task's failure still logs).
        for name in CELERY_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    consumer = logging.getLogger(CONSUMER_LOGGER)
    if not any(isinstance(f, _RetriedConnectionAsWarning) for f in consumer.filters):
        consumer.addFilter(_RetriedConnectionAsWarning())


@signals.celeryd_init.connect
def _early_logging(**_: Any) -> None:
    # The worker checks its privileges (a warning as root) before it sets up logging:
    # configured this early, that warning is a log line like any other, JSON off a terminal.
    _setup_logging()
