"""The webhook's state and request handlers: a push stored, and settled when it is final.

A valid push goes through :meth:`StatusCache.store
<smsbat_tracker.store.cache.StatusCache.store>` with the provider's timestamp, so a late,
duplicate or out-of-order push never overwrites a newer or final status. A newly stored
final status ends the tracking at once, in this process, through the same exactly-once
settle as the poller: the callbacks are enqueued before the answer. Redis (the cache or
the broker) unreachable answers 503; no input causes any other 5xx.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from smsbat_tracker import metrics
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.run import settle_from_cache
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.webhook.auth import carries_token, webhook_token
from smsbat_tracker.webhook.limiter import APPLY_THREADS, ApplySlots
from smsbat_tracker.webhook.openapi import openapi_document
from smsbat_tracker.webhook.schema import Push, PushRejected, read_push

if TYPE_CHECKING:
    from celery import Celery

    from smsbat_tracker.celery.tracker import Tracker
    from smsbat_tracker.engine.campaign.runner import CampaignRunner

__all__ = ["WebhookReceiver"]

log = get_logger(__name__)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "Redis (the cache or the broker) is unreachable": answered 503."""
    from kombu.exceptions import OperationalError

    return (redis.RedisError, OSError, OperationalError)


class WebhookReceiver:
    """The webhook's state and request handlers; :func:`create_app` wires them to routes.

    ``celery_app``: the Celery app whose tracker (:func:`smsbat_tracker.init_app`) the
    receiver works for; its settings are the receiver's unless ``settings`` are given, and
    the callbacks of a settle go out through it. Without one, the package's own app
    (:mod:`smsbat_tracker.worker`) is used.

    The engine is, in order of preference: the one given; the tracker's per-process engine
    when the tracker carries these very settings (one set of connections per process);
    otherwise one built here on first use and closed by :meth:`close`.

    Connections are made by :meth:`warm`: at start-up when served with its lifespan (or
    inside :meth:`lifespan`, which a host application can enter in its own), else before
    the first push or health check.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        celery_app: Celery | None = None,
        engine: Engine | None = None,
        settle: Callable[[str], None] | None = None,
    ) -> None:
        self._celery: Celery | None = celery_app
        self._tracker: Tracker | None = None
        if celery_app is not None:
            from smsbat_tracker.celery.tracker import tracker_of

            self._tracker = tracker_of(celery_app)  # NotInitialised without init_app
        elif engine is None or settle is None:
            # Imported here, not at module level: importing smsbat_tracker.worker builds the
            # Celery app from the environment, which may raise ConfigError; at build time
            # that is a clear start-up error, never one inside a request.
            from smsbat_tracker.worker import app as package_app

            self._celery = package_app
            self._tracker = package_app.tracker
        if settings is None:
            if self._tracker is None:
                raise TypeError("WebhookReceiver: give settings or a celery_app")
            settings = self._tracker.settings
        self.settings = settings
        self._token = webhook_token(settings)
        self._engine = engine
        if settle is None:
            import smsbat_tracker.celery.campaigns
            import smsbat_tracker.celery.track  # noqa: F401 - registers the tasks now, not later

            settle = self._settle_here
        self._settle = settle
        self._own_engine: Engine | None = None
        self._lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warmed = False
        self._unavailable = _unavailable_errors()
        self.apply_slots = ApplySlots(APPLY_THREADS)

    @property
    def open(self) -> bool:
        """True when no token is set and every request is accepted (SMSBAT_WEBHOOK_OPEN)."""
        return self._token is None

    @property
    def celery_app(self) -> Celery | None:
        """The Celery app whose tracker the receiver works for (None: given engine and
        settle only)."""
        return self._celery

    @property
    def warmed(self) -> bool:
        """Whether :meth:`warm` has run since the receiver was built or last closed."""
        return self._warmed

    def _shared_tracker(self) -> Tracker | None:
        """The tracker whose engine serves the receiver, when it carries these settings."""
        tracker = self._tracker
        # Looked up per call: Tracker.use (TrackerApp.reconfigure) replaces its settings.
        if self._engine is None and tracker is not None and tracker.settings is self.settings:
            return tracker
        return None

    @property
    def unavailable_errors(self) -> tuple[type[BaseException], ...]:
        """What "Redis (the cache or the broker) is unreachable" raises: answered 503."""
        return self._unavailable

    def shared_campaigns(self) -> CampaignRunner | None:
        """The tracker's campaign runner when the receiver shares its engine."""
        tracker = self._shared_tracker()
        return None if tracker is None else tracker.campaigns

    def engine(self) -> Engine:
        """The engine pushes are stored through (see the class docstring)."""
        if self._engine is not None:
            return self._engine
        tracker = self._shared_tracker()
        if tracker is not None:
            return tracker.engine  # per process: rebuilt after a fork
        with self._lock:
            if self._own_engine is None:
                self._own_engine = Engine(
                    self.settings,
                    redis_client(self.settings, decode_responses=True),
                    # The receiver never calls the provider: no credentials needed.
                    None,
                    app=self._celery,
                )
            return self._own_engine

    def _settle_here(self, message_id: str) -> None:
        """End the message's tracking in this process: its callbacks go out at once,
        through the engine's Celery app."""
        settle_from_cache(self.engine(), message_id, claimer=f"webhook-{uuid.uuid4().hex}")

    def warm(self) -> None:
        """Connect to Redis (and Celery's broker) before the first push; blocking.

        See :meth:`smsbat_tracker.celery.tracker.Tracker.warm`: cold, the first pushes of a
        burst waited up to 0.6 s behind it. An unreachable Redis is logged, not raised:
        pushes answer 503 until it is back.
        """
        tracker = self._shared_tracker()
        if tracker is not None:
            tracker.warm()
        else:
            try:
                self.engine().redis.ping()
            except self._unavailable as exc:  # answered 503 per push until Redis is back
                log.warning("webhook.warm_failed", error=type(exc).__name__)
        self._warmed = True

    async def ensure_warm(self) -> None:
        """:meth:`warm` once, off the event loop, unless already done (mounted in another
        application, the receiver's lifespan does not run: the first request warms it)."""
        if self._warmed:
            return
        await run_in_threadpool(self._warm_once)

    def _warm_once(self) -> None:
        with self._warm_lock:  # a burst's first requests wait for one warm-up, not each
            if not self._warmed:
                self.warm()

    def close(self) -> None:
        """Close the connections of an engine built here (never a given or shared one:
        the tracker's are closed by :meth:`Tracker.close
        <smsbat_tracker.celery.tracker.Tracker.close>`). The receiver can serve on afterwards; it
        connects again."""
        with self._lock:
            engine, self._own_engine = self._own_engine, None
            self._warmed = False
        if engine is not None:
            if engine.api is not None:
                engine.api.close()
            engine.redis.close()

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """Warm before the body of the ``async with``, close after it.

        For a host application that mounts the webhook (a mounted app's own lifespan never
        runs): enter it in the host's lifespan, or pass it as one,
        ``Router(routes, lifespan=receiver.lifespan)``.
        """
        await run_in_threadpool(self.warm)
        try:
            yield
        finally:
            self.close()

    # --- authentication and reading -------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the token, and no other (see
        :func:`~smsbat_tracker.webhook.auth.carries_token`); always, when the webhook is open."""
        return self._token is None or carries_token(request, self._token)

    async def read_push(self, request: Request) -> Push:
        """See :func:`smsbat_tracker.webhook.schema.read_push`."""
        return await read_push(request)

    # --- effect ---------------------------------------------------------------------

    def apply(self, push: Push) -> bool:
        """Store the push (blocking); settle the message when it carries a final status.

        A push that comes after the message's outcome is recorded is ignored: older than
        the outcome or contradicting it, the outcome stands."""
        stored = self.engine().cache.store(
            push.message_id, push.status, source="push", ts=push.ts, unless_finished=True
        )
        if push.status.is_final:
            # A duplicate settles too: if an earlier settle failed (the request answered
            # 503), the provider's retry finishes it. The settle is exactly-once, so a
            # duplicate of a settled message fires nothing.
            self._settle(push.message_id)
        return stored

    # --- handlers -------------------------------------------------------------------

    async def webhook(self, request: Request) -> Response:
        """``POST /webhook``."""
        pushes = metrics.get().pushes
        if not self.authorized(request):  # before reading a single byte of the body
            pushes.labels("unauthorized").inc()
            return JSONResponse({"error": "unauthorized"}, 401)
        try:
            push = await self.read_push(request)
        except PushRejected as rejected:
            pushes.labels("rejected").inc()
            log.debug(
                "webhook.rejected",
                http_status=rejected.status_code,
                error=rejected.error,
                field=rejected.field,
            )
            return rejected.response()
        await self.ensure_warm()
        try:
            async with self.apply_slots.slot(final=push.status.is_final):
                stored = await anyio.to_thread.run_sync(self.apply, push)
        except self._unavailable as exc:
            log.warning("webhook.unavailable", message_id=push.message_id, error=type(exc).__name__)
            pushes.labels("unavailable").inc()
            return JSONResponse(
                {"error": "unavailable", "field": None}, 503, headers={"Retry-After": "5"}
            )
        final = push.status.is_final
        pushes.labels("stored" if stored else "ignored").inc()
        log.info(
            "webhook.push",
            message_id=push.message_id,
            deliverystatus=push.status.deliverystatus,
            stored=stored,
            final=final,
        )
        return JSONResponse({"status": "stored" if stored else "ignored", "final": final})

    def ping(self) -> bool:
        """PING Redis through the engine (blocking)."""
        return bool(self.engine().redis.ping())

    async def healthz(self, _request: Request) -> Response:
        """``GET /healthz``."""
        try:
            await self.ensure_warm()
            ok = await run_in_threadpool(self.ping)
        except Exception as exc:  # any failure to reach Redis (or to build the engine) is "down"
            log.warning("webhook.unhealthy", error=type(exc).__name__, detail=str(exc))
            ok = False
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, 503)

    async def serve_metrics(self, _request: Request) -> Response:
        """``GET /metrics``: this receiver's metrics, in Prometheus's text format."""
        body = metrics.exposition(metrics.scrape_registry())
        return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``; mounted under a prefix, the document names it as its server."""
        return JSONResponse(openapi_document(root_path=request.scope.get("root_path", "")))
