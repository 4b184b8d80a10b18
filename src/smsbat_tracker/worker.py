"""The Celery application: ``celery -A smsbat_tracker.worker worker`` starts a worker.

Redis is the broker, the result backend and the status cache. The settings that make
countdown retries safe on Redis are set here, explicitly:

- ``visibility_timeout`` (``SMSBAT_VISIBILITY_TIMEOUT``, 1 h) far above every countdown
  (the settings refuse a ``SMSBAT_MAX_DELAY`` above a quarter of it): a waiting countdown
  task is held unacked, and one that outlived the timeout would run twice;
- ``acks_late`` with ``reject_on_worker_lost``: a prefork child killed mid-task has its
  message requeued at once by its parent;
- the re-driver (:mod:`smsbat_tracker.redrive`), a bootstep of every worker: what a
  whole worker held when it died, or what a Redis restart dropped, resumes within
  ``SMSBAT_REDRIVE_AFTER`` instead of the visibility timeout;
- JSON only, task events on (Flower), and the deadline is tracked by the task itself,
  never by Celery's ``expires``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import Celery, current_app, signals
from kombu import Queue
from kombu.exceptions import OperationalError

from smsbat_tracker import metrics, tracebacks
from smsbat_tracker.campaign import CampaignRunner
from smsbat_tracker.client import SmsbatClient
from smsbat_tracker.config import NO_CREDENTIALS, Settings, load_settings
from smsbat_tracker.connections import is_sentinel_url, redis_client
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.keys import Keys
from smsbat_tracker.log import configure_logging, get_logger
from smsbat_tracker.redrive import PUBLISHED_AT, TICK_TASK, TRACK_TASK, RedriveStep
from smsbat_tracker.tracking import Engine

__all__ = ["TrackerApp", "app", "create_app"]

log = get_logger(__name__)


class TrackerApp(Celery):
    """A Celery app that carries its :class:`Settings` and one :class:`Engine` per process."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self._engine: Engine | None = None
        self._engine_pid = 0
        self._engine_lock = threading.Lock()
        self._campaigns: CampaignRunner | None = None
        self._metrics_server: tuple[Any, Path | None] | None = None

    @property
    def engine(self) -> Engine:
        """This process's engine; built on first use and again after a fork."""
        pid = os.getpid()
        if self._engine is None or self._engine_pid != pid:
            with self._engine_lock:
                if self._engine is None or self._engine_pid != pid:
                    # Connections are not shared across fork: build new ones in the child.
                    client = redis_client(
                        self.settings, decode_responses=True, health_check_interval=30
                    )
                    # A process that only enqueues needs no credentials (a worker checks).
                    api = (
                        SmsbatClient.from_settings(self.settings)
                        if self.settings.has_credentials
                        else None
                    )
                    self._engine = Engine(self.settings, client, api, app=self)
                    self._engine_pid = pid
        return self._engine

    def warm(self) -> None:
        """Build this process's engine and Celery producer now, connected to Redis.

        Built on first use instead, they cost the first task or push ~0.2 s of CPU (the HTTP
        client's TLS context, kombu's transport imports and connection), and a burst that
        arrives meanwhile queues behind them: 0.2-0.6 s on the first callbacks.
        """
        try:
            self.finalize(auto=True)
            _ = self.backend  # send_task builds an AsyncResult, which needs it
            self.engine.redis.ping()
            with self.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1)
        except (redis.RedisError, OSError, OperationalError) as exc:
            # The consumer retries the broker; tasks and pushes connect on first use.
            log.warning("worker.warm_failed", error=type(exc).__name__)

    @property
    def campaigns(self) -> CampaignRunner:
        """This process's campaign runner (shares the engine's connections)."""
        engine = self.engine
        runner = self._campaigns
        if runner is None or runner.engine is not engine:
            runner = self._campaigns = CampaignRunner(engine)
        return runner

    def reconfigure(self, settings: Settings) -> None:
        """Use other settings from now on (tests, embedding applications, the demo).

        Call before a worker starts. Celery's broker connections are dropped, so that the
        next publish goes to the new ``REDIS_URL``.
        """
        self.close_engine()
        self.settings = settings
        self.conf.update(celery_config(settings))
        # kombu keeps its pools per broker URL: forgetting ours makes the next publish
        # take (or build) the pool of the new one.
        self._pool = None
        amqp = self.amqp
        amqp._producer_pool = None  # type: ignore[attr-defined]
        # Celery caches the routes, the queues and the router built from the first
        # settings: build them again from these (SMSBAT_QUEUE may have changed).
        amqp.flush_routes()
        for cached in ("queues", "default_queue", "router"):
            amqp.__dict__.pop(cached, None)

    def serve_metrics(self) -> None:
        """Serve Prometheus metrics on ``SMSBAT_METRICS_PORT`` from this process.

        Call in the worker's parent before its pool starts: every process of the worker
        then counts into one multiprocess directory (``SMSBAT_METRICS_DIR``, else a new
        temporary one), emptied first, which a scrape adds up. Stops start-up with a clear
        message when the port cannot be bound.
        """
        from prometheus_client import start_http_server

        settings = self.settings
        made = settings.metrics_dir is None
        path = metrics.use_directory(settings.metrics_dir or tempfile.mkdtemp(prefix="smsbat-"))
        registry = metrics.scrape_registry(
            metrics.RedisCollector(lambda: self.engine.redis, Keys(settings.key_prefix).due())
        )
        try:
            server, _ = start_http_server(settings.metrics_port, settings.metrics_host, registry)
        except OSError as exc:
            if made:
                metrics.remove_directory(path)
            raise SystemExit(
                f"smsbat-tracker: SMSBAT_METRICS_PORT={settings.metrics_port}: cannot serve "
                f"metrics on {settings.metrics_host} ({exc.strerror or type(exc).__name__})"
            ) from None
        self._metrics_server = (server, path if made else None)
        log.info("worker.metrics", port=settings.metrics_port, directory=str(path))

    def stop_metrics(self) -> None:
        """Stop serving metrics; remove the temporary directory the worker made."""
        if self._metrics_server is not None:
            server, made = self._metrics_server
            self._metrics_server = None
            server.shutdown()
            server.server_close()
            if made is not None:
                metrics.remove_directory(made)

    def close_engine(self) -> None:
        """Close this process's connections (tests, embedding applications)."""
        with self._engine_lock:
            if self._engine is not None and self._engine_pid == os.getpid():
                if self._campaigns is not None:
                    self._campaigns.close()
                if self._engine.api is not None:
                    self._engine.api.close()
                self._engine.redis.close()
            self._engine = None
            self._campaigns = None


def create_app(settings: Settings | None = None) -> TrackerApp:
    """Build the Celery app for ``settings`` (default: from the environment)."""
    settings = settings or load_settings(credentials=False)
    tracker = TrackerApp(
        settings,
        "smsbat_tracker",
        include=["smsbat_tracker.tasks", "smsbat_tracker.recipes"],
    )
    tracker.conf.update(celery_config(settings))
    tracker.steps["worker"].add(RedriveStep)
    return tracker


# Priority of tracking checks on the Redis transport, where 0 is served first.
TRACK_PRIORITY = 6
# Celery's default queue: callbacks (and everything not routed) go there.
DEFAULT_QUEUE = "celery"


# The tracker's own tasks: routed to SMSBAT_QUEUE when it is set.
TRACKER_TASKS = (
    "smsbat_tracker.track_message",
    "smsbat_tracker.settle_message",
    "smsbat_tracker.track_campaign",
    "smsbat_tracker.campaign_tick",
)


def _routes(settings: Settings) -> dict[str, dict[str, Any]]:
    routes: dict[str, dict[str, Any]] = {name: {} for name in TRACKER_TASKS}
    # Checks, and campaign ticks, share one priority list: the re-driver reads its oldest
    # task's age (see smsbat_tracker.redrive).
    routes["smsbat_tracker.track_message"]["priority"] = TRACK_PRIORITY
    routes["smsbat_tracker.campaign_tick"]["priority"] = TRACK_PRIORITY
    if settings.queue:
        for route in routes.values():
            route["queue"] = settings.queue
    return {name: route for name, route in routes.items() if route}


def _queues(settings: Settings) -> list[Queue] | None:
    if not settings.queue or settings.queue == DEFAULT_QUEUE:
        return None  # Celery's default: the one default queue
    # A worker without -Q consumes both: setting the variable alone never strands a task.
    return [Queue(DEFAULT_QUEUE), Queue(settings.queue)]


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for ``settings``."""
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
            **sentinel,
        },
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            **sentinel,
        },
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
        # Checks wait behind settles and callbacks (no priority: 0, served first on Redis),
        # so a burst of new trackers never delays an outcome that is already known.
        "task_routes": _routes(settings),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
        "task_queues": _queues(settings),
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
# Each retry's traceback copy keeps one code position per frame, not ~190 KB of them.
tracebacks.lean_copies()


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    settings = app.settings
    configure_logging(
        level=loglevel or "INFO",
        secrets=[
            settings.api_key.get_secret_value() if settings.api_key else None,
            settings.password.get_secret_value() if settings.password else None,
            settings.webhook_token.get_secret_value() if settings.webhook_token else None,
        ],
    )


@signals.worker_init.connect
def _warm_worker(sender: Any = None, **_: Any) -> None:
    # A prefork pool's children each warm their own engine (worker_process_init); the
    # parent runs no tasks. Every other pool runs tasks in this process.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    tracker = getattr(sender, "app", None)
    if isinstance(tracker, TrackerApp) and not tracker.settings.has_credentials:
        # A worker calls the API; enqueuing and the webhook receiver need no credentials.
        raise SystemExit(f"smsbat-tracker: invalid settings: {NO_CREDENTIALS}")
    if isinstance(tracker, TrackerApp) and tracker.settings.metrics_port:
        tracker.serve_metrics()  # before the pool forks: its children count into its directory
    pool = getattr(sender, "pool_cls", None)
    if isinstance(tracker, TrackerApp) and pool and get_implementation(pool) is not PreforkPool:
        tracker.warm()


@signals.worker_shutdown.connect
def _stop_metrics(sender: Any = None, **_: Any) -> None:
    tracker = getattr(sender, "app", None)
    if isinstance(tracker, TrackerApp):
        tracker.stop_metrics()


@signals.worker_process_init.connect
def _warm_child(**_: Any) -> None:
    tracker = current_app
    if isinstance(tracker, TrackerApp):
        tracker.warm()


@signals.before_task_publish.connect
def _stamp_published_at(sender: str | None = None, headers: Any = None, **_: Any) -> None:
    # The re-driver tells a task waiting behind a backlog from a lost one by this stamp.
    if sender in (TRACK_TASK, TICK_TASK) and isinstance(headers, dict):
        headers[PUBLISHED_AT] = time.time()


@signals.task_prerun.connect
def _bind_task_context(
    task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    structlog.contextvars.clear_contextvars()
    context: dict[str, Any] = {"task_id": task_id, "task_name": getattr(task, "name", None)}
    message_id = (kwargs or {}).get("message_id")
    if message_id is None and args and isinstance(args[0], str):
        message_id = args[0]
    if message_id is not None:
        context["message_id"] = message_id
    structlog.contextvars.bind_contextvars(**context)


@signals.task_postrun.connect
def _unbind_task_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
