"""``init_app(app)``: the tracker inside a Celery app, the user's own or the package's.

One call on the app, where it is created (``proj/celery.py``)::

    app = Celery("shop")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    smsbat_tracker.init_app(app)

After it, ``celery -A shop worker`` runs the tracker's tasks (shared tasks: they bind to
whichever app is current), its re-driver and its worker hooks. Nothing is done at import;
a worker of an app that never called ``init_app`` is untouched, and a process that only
enqueues runs no worker hook at all: they are bootsteps, which only that app's workers run.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Queue

from smsbat_tracker.celery.compat import billiard_tracebacks, retry
from smsbat_tracker.celery.names import TICK_TASK, TRACK_PRIORITY, TRACK_TASK, TRACKER_TASKS
from smsbat_tracker.celery.redrive import RedriveStep
from smsbat_tracker.celery.tracker import Tracker, attach, find_tracker
from smsbat_tracker.config import NO_CREDENTIALS, Settings, load_settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import get_logger, register_secret
from smsbat_tracker.redis_url import is_sentinel_url
from smsbat_tracker.store.connections import socket_options, unknown_master

__all__ = ["DEFAULT_QUEUE", "TrackerStep", "init_app", "tracker_routes"]

log = get_logger(__name__)

# Celery's default queue: callbacks (and everything not routed) go there.
DEFAULT_QUEUE = "celery"
# Broker schemes the tracker works with: its re-driver reads the broker's lists in Redis.
_REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://", "unix://")


def init_app(app: Celery, settings: Settings | None = None, **overrides: Any) -> Tracker:
    """Run the tracker on ``app``; returns its :class:`~smsbat_tracker.celery.tracker.Tracker`.

    Settings come from the environment (``SMSBAT_*``) with ``overrides`` (field names, e.g.
    ``deadline=300``) taking precedence, or are ``settings`` as given. The tracker keeps
    its state in the app's broker, which must be Redis: any other broker is refused with
    a :class:`ConfigError`. The app's own ``visibility_timeout`` (broker transport
    options), when set, is the tracker's too. Calling it again returns the same tracker.
    """
    existing = find_tracker(app)
    if existing is not None:
        return existing
    broker = _redis_broker(app)
    if settings is None:
        transport = dict(app.conf.broker_transport_options or {})
        values = dict(overrides)
        if "redis_url" in values and values["redis_url"] != broker:
            raise ConfigError(
                "redis_url: the tracker keeps its state in the Celery broker's Redis; set "
                "the app's broker_url instead"
            )
        values["redis_url"] = broker
        if "visibility_timeout" in transport:
            values.setdefault("visibility_timeout", transport["visibility_timeout"])
        if "master_name" in transport:
            values.setdefault("sentinel_master", transport["master_name"])
        settings = load_settings(credentials=False, **values)
    elif overrides:
        raise TypeError("init_app: give either settings or keyword overrides, not both")
    # The package's own log lines never show these, in whatever logging the host has.
    for secret in settings.secret_values:
        register_secret(secret)
    configure(app, settings)
    tracker = Tracker(app, settings)
    attach(app, tracker)  # last: an app that raised above carries no half-set tracker
    steps = app.steps["worker"]
    steps.add(TrackerStep)
    steps.add(RedriveStep)
    # The shared tasks: every app takes them when it is finalized.
    import smsbat_tracker.celery.campaigns
    import smsbat_tracker.celery.track  # noqa: F401

    return tracker


def _redis_broker(app: Celery) -> str:
    broker = app.conf.broker_url or ""
    if isinstance(broker, list | tuple):
        broker = ";".join(str(b) for b in broker)
    broker = str(broker)
    if not broker.startswith(_REDIS_SCHEMES):
        scheme = broker.partition("://")[0] or "amqp (Celery's default)"
        name = f"Celery app {app.main!r}" if app.main else "this Celery app"
        raise ConfigError(
            f"broker_url: smsbat-tracker needs Redis as the Celery broker, and {name} uses "
            f"{scheme}: the tracker keeps its sessions beside the broker's queues in Redis "
            "and re-drives lost tasks from them"
        )
    return broker


def tracker_routes(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery routes of the tracker's tasks (a ``task_routes`` mapping)."""
    routes: dict[str, dict[str, Any]] = {name: {} for name in TRACKER_TASKS}
    # Checks, and campaign ticks, share one priority list: the re-driver reads its oldest
    # task's age (see smsbat_tracker.celery.redrive).
    routes[TRACK_TASK]["priority"] = TRACK_PRIORITY
    routes[TICK_TASK]["priority"] = TRACK_PRIORITY
    if settings.queue:
        for route in routes.values():
            route["queue"] = settings.queue
    return {name: route for name, route in routes.items() if route}


def configure(app: Celery, settings: Settings) -> None:
    """Set what the tracker's tasks need on ``app``, keeping every setting the app has.

    The app's routers come first (a route the user wrote for a tracker task wins), then
    the tracker's; broker transport options the app sets are kept. With ``SMSBAT_QUEUE``,
    an app with no queue list gets the default queue and the tracker's, so that a worker
    without ``-Q`` consumes both.
    """
    conf = app.conf
    transport = dict(conf.broker_transport_options or {})
    transport.setdefault("visibility_timeout", settings.visibility_timeout)
    transport.setdefault("unacked_restore_interval", settings.unacked_restore_interval)
    transport.setdefault("unacked_restore_throttle", 1)
    for option, value in socket_options().items():  # a frozen Redis holds no call for good
        transport.setdefault(option, value)
    if is_sentinel_url(settings.redis_url):
        transport.setdefault("master_name", settings.sentinel_master)
    conf.broker_transport_options = transport

    previous = getattr(app, "_smsbat_routes", None)
    routes = conf.task_routes
    if routes is None:
        existing: tuple[Any, ...] = ()
    elif isinstance(routes, list | tuple):
        existing = tuple(r for r in routes if r is not previous)
    else:
        existing = () if routes is previous else (routes,)
    ours = tracker_routes(settings)
    app._smsbat_routes = ours  # type: ignore[attr-defined]
    conf.task_routes = (*existing, ours)

    if settings.queue and settings.queue != DEFAULT_QUEUE:
        queues = conf.task_queues
        default = conf.task_default_queue or DEFAULT_QUEUE
        if queues is None:
            conf.task_queues = [Queue(default), Queue(settings.queue)]
        elif all(getattr(q, "name", q) != settings.queue for q in queues):
            conf.task_queues = [*queues, Queue(settings.queue)]
    # Celery caches the routes, the queues and the router it built: build them anew.
    amqp = app.amqp
    amqp.flush_routes()
    for cached in ("queues", "default_queue", "router"):
        amqp.__dict__.pop(cached, None)


class TrackerStep(bootsteps.StartStopStep):
    """Worker bootstep: the tracker's worker hooks, on the workers of its app only.

    Before the pool starts: the worker needs API credentials (it stops with one line
    otherwise), serves metrics when ``SMSBAT_METRICS_PORT`` is set (the pool's children
    count into its directory), and trims the traceback copies of each retry. Then every
    process that runs tasks builds its connections before the first task.
    """

    label = "smsbat tracker"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tracker = find_tracker(getattr(parent, "app", None))
        self._warm_uid = f"smsbat-warm-{id(self.tracker)}"
        tracker = self.tracker
        if tracker is None:
            return
        if not tracker.settings.has_credentials:
            # A worker calls the API; enqueuing and the webhook receiver need no credentials.
            raise SystemExit(f"smsbat-tracker: invalid settings: {NO_CREDENTIALS}")
        if (wrong := unknown_master(tracker.settings)) is not None:
            raise SystemExit(f"smsbat-tracker: invalid settings: {wrong}")
        # A Celery the retry patch was not made for stops the worker here, not at a retry.
        retry.install()
        # Each retry's traceback copy keeps one code position per frame, not ~190 KB of them.
        billiard_tracebacks.install()
        if tracker.settings.metrics_port:
            tracker.serve_metrics()  # before the pool forks: its children count into it
        if _is_prefork(getattr(parent, "pool_cls", None)):
            # Each child warms its own connections; the parent runs no tasks.
            signals.worker_process_init.connect(
                self._warm_child, weak=False, dispatch_uid=self._warm_uid
            )

    def _warm_child(self, **_: Any) -> None:
        if self.tracker is not None:
            self.tracker.warm()

    def start(self, parent: Any) -> None:
        tracker = self.tracker
        if tracker is not None and not _is_prefork(getattr(parent, "pool_cls", None)):
            tracker.warm()

    def stop(self, parent: Any) -> None:
        if self.tracker is not None:
            self.tracker.stop_metrics()

    # A cold shutdown terminates the steps instead of stopping them.
    terminate = shutdown = stop


def _is_prefork(pool: Any) -> bool:
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    return bool(pool) and get_implementation(pool) is PreforkPool
