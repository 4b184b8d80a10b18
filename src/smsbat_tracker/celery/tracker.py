"""The tracker on one Celery app: its settings and this process's engine and connections.

:func:`smsbat_tracker.init_app` attaches a :class:`Tracker` to a Celery app; the tasks find
it with :func:`tracker_of` through the app they are bound to (``task.app``), so that the
same shared tasks serve the user's own app and the package's (``smsbat_tracker.worker``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from smsbat_tracker import metrics
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.campaign import CampaignRunner
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.errors import NotInitialised
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.store.keys import Keys

__all__ = ["Tracker", "attach", "find_tracker", "tracker_of"]

log = get_logger(__name__)

# Where a Celery app carries its tracker (set by init_app).
_ATTRIBUTE = "_smsbat_tracker"


def _fresh_lock_in_children(tracker: Tracker) -> None:
    """Give ``tracker`` a new engine lock in every child forked from now on."""
    ref = weakref.ref(tracker)

    def renew() -> None:
        alive = ref()
        if alive is not None:
            alive._engine_lock = threading.Lock()

    os.register_at_fork(after_in_child=renew)


class Tracker:
    """The tracker's state on one Celery app: :class:`Settings`, and per process one
    :class:`Engine` (Redis and API connections) and one :class:`CampaignRunner`."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._engine: Engine | None = None
        self._engine_pid = 0
        self._engine_lock = threading.Lock()
        # A child forked while a thread of its parent builds the engine (the re-driver's
        # first beat, as the pool starts) would inherit the lock held, by a thread it does
        # not have: every child gets a fresh one.
        _fresh_lock_in_children(self)
        self._campaigns: CampaignRunner | None = None
        self._metrics_server: tuple[Any, Path | None] | None = None
        self._health_client: redis.Redis | None = None
        # When this worker's re-driver last beat with Redis in reach (monotonic; its
        # bootstep writes it): what /healthz reads.
        self.last_beat: float | None = None

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
                    self._engine = Engine(self.settings, client, api, app=self.app)
                    self._engine_pid = pid
        return self._engine

    @property
    def campaigns(self) -> CampaignRunner:
        """This process's campaign runner (shares the engine's connections)."""
        engine = self.engine
        runner = self._campaigns
        if runner is None or runner.engine is not engine:
            runner = self._campaigns = CampaignRunner(engine)
        return runner

    def warm(self) -> None:
        """Build this process's engine and Celery producer now, connected to Redis.

        Built on first use instead, they cost the first task or push ~0.2 s of CPU (kombu's
        transport imports and connection), and a burst that arrives meanwhile queues
        behind them: 0.2-0.6 s on the first callbacks.
        """
        app = self.app
        try:
            app.finalize(auto=True)
            _ = app.backend  # send_task builds an AsyncResult, which needs it
            self.engine.redis.ping()
            with app.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1)
        except (redis.RedisError, OSError, OperationalError) as exc:
            # The consumer retries the broker; tasks and pushes connect on first use.
            log.warning("worker.warm_failed", error=type(exc).__name__)

    def use(self, settings: Settings) -> None:
        """Use other settings from now on; this process's connections are closed."""
        self.close()
        self.settings = settings

    def serve_metrics(self) -> None:
        """Serve Prometheus metrics on ``SMSBAT_METRICS_PORT`` from this process.

        Call in the worker's parent before its pool starts: every process of the worker
        then counts into one multiprocess directory (``SMSBAT_METRICS_DIR``, else a new
        temporary one), emptied first, which a scrape adds up. ``/healthz`` answers the
        worker's health (:mod:`smsbat_tracker.celery.health`). Stops start-up with a clear
        message when the port cannot be bound.
        """
        from prometheus_client import make_wsgi_app

        from smsbat_tracker.celery.health import Health, serve

        settings = self.settings
        made = settings.metrics_dir is None
        path = metrics.use_directory(settings.metrics_dir or tempfile.mkdtemp(prefix="smsbat-"))
        registry = metrics.scrape_registry(
            metrics.RedisCollector(lambda: self.engine.redis, Keys(settings.key_prefix).due())
        )
        health = Health(self._health_redis, lambda: self.last_beat)
        try:
            server, _ = serve(
                settings.metrics_host, settings.metrics_port, health.wsgi(make_wsgi_app(registry))
            )
        except OSError as exc:
            if made:
                metrics.remove_directory(path)
            raise SystemExit(
                f"smsbat-tracker: SMSBAT_METRICS_PORT={settings.metrics_port}: cannot serve "
                f"metrics on {settings.metrics_host} ({exc.strerror or type(exc).__name__})"
            ) from None
        self._metrics_server = (server, path if made else None)
        log.info("worker.metrics", port=settings.metrics_port, directory=str(path))

    def _health_redis(self) -> redis.Redis:
        """The client /healthz pings with (short timeouts: it answers within 5 s)."""
        from smsbat_tracker.celery.health import ping_options

        client = self._health_client
        if client is None:
            client = self._health_client = redis_client(self.settings, **ping_options())
        return client

    def stop_metrics(self) -> None:
        """Stop serving metrics; remove the temporary directory the worker made."""
        if self._health_client is not None:
            self._health_client.close()
            self._health_client = None
        if self._metrics_server is not None:
            server, made = self._metrics_server
            self._metrics_server = None
            server.shutdown()
            server.server_close()
            if made is not None:
                metrics.remove_directory(made)

    def close(self) -> None:
        """Close this process's connections (tests, embedding applications)."""
        with self._engine_lock:
            if self._engine is not None and self._engine_pid == os.getpid():
                if self._campaigns is not None:
                    self._campaigns.close()
                if self._engine.checks.late is not None:
                    self._engine.checks.late.close()  # before the client its requests use
                if self._engine.api is not None:
                    self._engine.api.close()
                self._engine.redis.close()
            self._engine = None
            self._campaigns = None


def tracker_of(app: Celery) -> Tracker:
    """The tracker ``app`` carries; raises :class:`NotInitialised` when it has none."""
    tracker = getattr(app, _ATTRIBUTE, None)
    if isinstance(tracker, Tracker):
        return tracker
    name = f"Celery app {app.main!r}" if app.main else "the default Celery app"
    raise NotInitialised(
        f"{name} does not run smsbat-tracker: call smsbat_tracker.init_app(app) where the "
        "app is created (e.g. proj/celery.py), or use the package's own app "
        "(smsbat_tracker.worker)"
    )


def find_tracker(app: Any) -> Tracker | None:
    """The tracker ``app`` carries, or None (a worker of an app that runs no tracker)."""
    tracker = getattr(app, _ATTRIBUTE, None)
    return tracker if isinstance(tracker, Tracker) else None


def attach(app: Celery, tracker: Tracker) -> None:
    """Make ``tracker`` the one ``app`` carries (see :func:`smsbat_tracker.init_app`)."""
    setattr(app, _ATTRIBUTE, tracker)
