"""The webhook receiver: SMSBAT pushes status changes here instead of waiting for a poll.

Serve it with ``uvicorn smsbat_tracker.webhook:app`` or ``smsbat-tracker webhook
--host 0.0.0.0 --port 8000``, and give the provider ``https://<host>/webhook?token=<secret>``.

Or mount it in the project's own ASGI app, for the project's Celery app (the one that
called :func:`smsbat_tracker.init_app`)::

    webhook = create_app(celery_app=celery_app)
    app.mount("/smsbat", webhook)  # Starlette, FastAPI: /smsbat/webhook?token=<secret>

A mounted app's lifespan does not run: the receiver connects on its first request, or,
to connect at start-up and close at shutdown, in the host's own lifespan::

    async with webhook.state.receiver.lifespan():
        yield

Any ASGI app works as the host: Django's ``get_asgi_application()`` behind a Starlette
``Router([Mount("/smsbat", webhook), Mount("/", django_app)])``.

Routes:

- ``POST /webhook``: one push, ``{"messageId", "deliverystatus", "timestamp", "cost"}``.
  Authenticated by the shared secret ``SMSBAT_WEBHOOK_TOKEN`` in the query parameter
  ``token`` (the provider only takes a URL) or the header ``X-Webhook-Token``; a wrong
  token in either place is refused, whatever the other holds. A valid push
  goes through :meth:`StatusCache.store <smsbat_tracker.store.cache.StatusCache.store>` with the
  provider's timestamp, so a late, duplicate or out-of-order push never overwrites a newer
  or final status. A newly stored final status ends the tracking at once, in this process,
  through the same exactly-once settle as the poller: the callbacks are enqueued before the
  answer.
- ``GET /healthz``: 200 when Redis answers PING, else 503.
- ``GET /openapi.json``: an OpenAPI 3.1 description of the above, its schemas generated
  from the models that validate the pushes and shape the answers (:class:`PushBody`).

Answers: 200 ``{"status": "stored"|"ignored", "final": bool}``; 401 ``{"error":
"unauthorized"}``; 400/413/415/422 ``{"error": "...", "field": <name or null>}``; 503 when
Redis is unreachable. No input causes any other 5xx.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import sys
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import anyio
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from smsbat_tracker import metrics
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.engine.tracking import Engine
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import configure_logging, get_logger, redact_text, register_secret
from smsbat_tracker.provider.models import MAX_MESSAGE_ID_LENGTH, MESSAGE_ID_PATTERN, MessageStatus
from smsbat_tracker.store.connections import redis_client

if TYPE_CHECKING:
    from celery import Celery

    from smsbat_tracker.celery.tracker import Tracker

__all__ = [
    "APPLY_THREADS",
    "MAX_BODY_BYTES",
    "TOKEN_HEADER",
    "Accepted",
    "ApplyGate",
    "Health",
    "LazyWebhookApp",
    "Push",
    "PushBody",
    "PushRejected",
    "Rejection",
    "Unauthorized",
    "WebhookReceiver",
    "app",
    "create_app",
    "main",
    "openapi_document",
    "parse_push",
]

MAX_BODY_BYTES: Final = 64 * 1024
MAX_STATUS_LENGTH: Final = 64
MAX_TIMESTAMP_LENGTH: Final = 64
TOKEN_HEADER: Final = "X-Webhook-Token"  # noqa: S105 - a header name, not a secret
TOKEN_QUERY: Final = "token"  # noqa: S105 - a parameter name
# Pushes stored (and settled) at once. The work is short and mostly Python: more threads
# only take turns on the GIL, so that every push in a burst finishes late; with a few, a
# burst is served in arrival order, final statuses first (see ApplyGate).
APPLY_THREADS: Final = 4

# Visible ASCII only: a pushed status ends up in the cache, in log lines and in callback
# results, where whitespace and control characters (line breaks) only do harm.
_JSON_CHARSETS: Final = frozenset({"utf-8", "utf8"})

log = get_logger(__name__)


# --------------------------------------------------------------------- parsing


class PushRejected(Exception):
    """A request the webhook refuses: the HTTP status, a message and the offending field."""

    def __init__(self, status_code: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status_code = status_code
        self.error = error
        self.field = field

    def response(self) -> JSONResponse:
        """The JSON answer for this rejection."""
        return JSONResponse({"error": self.error, "field": self.field}, self.status_code)


@dataclass(frozen=True, slots=True)
class Push:
    """One validated push: the status to cache and the provider's timestamp (epoch s)."""

    message_id: str
    status: MessageStatus
    ts: float


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity by default; JSON itself does not.
    raise ValueError(f"{name} is not valid JSON")


def _timestamp_epoch(value: str) -> float:
    """Epoch seconds of an ISO-8601 date and time with a timezone; ValueError otherwise."""
    text = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        when = datetime.fromisoformat(text)
    except (ValueError, TypeError, OverflowError):
        raise ValueError("not an ISO-8601 date and time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("must carry a timezone (e.g. Z or +02:00)")
    try:
        return when.timestamp()
    except (ValueError, OverflowError):  # pragma: no cover - aware datetimes always convert
        raise ValueError("out of range") from None


class PushBody(BaseModel):
    """A status push as the provider sends it: the one source of the receiver's checks and
    of the request body in its OpenAPI document. Fields added later are ignored."""

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        json_schema_extra={
            "example": {
                "messageId": "abc123def456",
                "deliverystatus": "delivered",
                "timestamp": "2025-01-23T10:30:00Z",
                "cost": 0.05,
            }
        },
    )

    messageId: Annotated[
        str,
        Field(min_length=1, max_length=MAX_MESSAGE_ID_LENGTH, pattern=MESSAGE_ID_PATTERN),
    ]
    deliverystatus: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_STATUS_LENGTH,
            pattern=r"^[!-~]+$",
            description="scheduled, processing, delivered, undeliverable, permanenterror; "
            "unknown values are kept and treated as not final",
        ),
    ]
    timestamp: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_TIMESTAMP_LENGTH,
            json_schema_extra={"format": "date-time"},
            description="ISO-8601 with a timezone; orders late and duplicate pushes",
        ),
    ]
    cost: Annotated[float | None, Field(allow_inf_nan=False)] = None

    @field_validator("timestamp")
    @classmethod
    def _aware_timestamp(cls, value: str) -> str:
        _timestamp_epoch(value)
        return value


class Accepted(BaseModel):
    """200: the push was stored, or ignored as a duplicate or stale one."""

    status: Literal["stored", "ignored"]
    final: bool = Field(description="whether the pushed status is final")


class Rejection(BaseModel):
    """400, 413, 415, 422 and 503: what was wrong."""

    error: str
    field: str | None = Field(
        description="the offending body field, null when the body as a whole is bad"
    )


class Unauthorized(BaseModel):
    """401: a missing or wrong token."""

    error: Literal["unauthorized"]


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "unavailable"]


def parse_push(body: bytes) -> Push:
    """Validate a push body; raise :class:`PushRejected` (400 or 422) when it is unusable.

    400 for anything that is not one UTF-8 JSON object; 422 naming the first bad field
    (:class:`PushBody` holds the rules).
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except Exception:  # decode errors, bad JSON, too deep, too-long integers: all 400
        raise PushRejected(400, "body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise PushRejected(400, "body must be a JSON object")
    try:
        push = PushBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        name = str(first["loc"][0]) if first["loc"] else None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise PushRejected(422, f"{name}: {message}" if name else message, name) from None
    fields: dict[str, Any] = {"deliverystatus": push.deliverystatus, "messageId": push.messageId}
    if "cost" in push.model_fields_set:  # absent stays unset: the cache shows what was sent
        fields["cost"] = push.cost
    status = MessageStatus(**fields)
    return Push(message_id=push.messageId, status=status, ts=_timestamp_epoch(push.timestamp))


def _is_json_media_type(value: str | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8``; nothing else."""
    if value is None:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    params = params.strip()
    if not params:
        return True
    name, sep, charset = params.partition("=")
    return (
        bool(sep)
        and name.strip().lower() == "charset"
        and charset.strip().strip('"').lower() in _JSON_CHARSETS
    )


# --------------------------------------------------------------------- the receiver


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "Redis (the cache or the broker) is unreachable": answered 503."""
    from kombu.exceptions import OperationalError

    return (redis.RedisError, OSError, OperationalError)


class ApplyGate:
    """At most ``slots`` pushes applied at once; a waiting final status goes first.

    A final push settles its message and fires the callbacks, which someone waits for; a
    non-final one only refreshes the cache. When a send starts, the provider pushes a
    "processing" for every message at once, and the first finals among them should not
    wait behind all of it. Pushes of one kind keep their arrival order. Under a steady
    stream of finals the others wait longest, and lose least: a final status supersedes
    them. Lives on one event loop: the receiver's.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Waiters only exist while no slot is free: a released slot passes to the first
        # waiting final push, else to the first other one, else back to the pool.
        self._finals: deque[anyio.Event] = deque()
        self._others: deque[anyio.Event] = deque()

    @asynccontextmanager
    async def slot(self, *, final: bool) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``."""
        await self._acquire(final)
        try:
            yield
        finally:
            self._release()

    @property
    def waiting(self) -> tuple[int, int]:
        """Pushes waiting for a slot: ``(final, other)``."""
        return len(self._finals), len(self._others)

    async def _acquire(self, final: bool) -> None:
        if self._free:
            self._free -= 1
            return
        queue = self._finals if final else self._others
        turn = anyio.Event()
        queue.append(turn)
        try:
            await turn.wait()
        except BaseException:  # cancelled (the client went away, the server stops)
            if turn.is_set():
                self._release()  # handed a slot it will not use: pass it on
            else:
                queue.remove(turn)
            raise

    def _release(self) -> None:
        for queue in (self._finals, self._others):
            if queue:
                queue.popleft().set()
                return
        self._free += 1


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
        token = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
        if not token and not settings.webhook_open:
            raise ConfigError(
                "invalid settings: SMSBAT_WEBHOOK_TOKEN: required by the webhook (set "
                "SMSBAT_WEBHOOK_OPEN=true to run it without authentication, for local tests only)"
            )
        register_secret(token)  # whatever logging is configured later redacts it too
        self._token: bytes | None = token.encode() if token else None
        self._engine = engine
        if settle is None:
            import smsbat_tracker.celery.tasks  # noqa: F401 - registers the tasks now, not later

            settle = self._settle_here
        self._settle = settle
        self._own_engine: Engine | None = None
        self._lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warmed = False
        self._unavailable = _unavailable_errors()
        self.gate = ApplyGate(APPLY_THREADS)

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
        from smsbat_tracker.celery.tasks import settle_from_cache

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
        """Whether the request carries the token, and no other: every header and query
        value given must be the token (a wrong one beside a right one is refused)."""
        if self._token is None:
            return True
        header_name = TOKEN_HEADER.lower().encode()
        # Raw header bytes: no decoding to get wrong.
        headers = request.scope.get("headers", ())
        candidates = [value for name, value in headers if name == header_name]
        candidates += [
            query.encode("utf-8", "replace") for query in request.query_params.getlist(TOKEN_QUERY)
        ]
        matched = bool(candidates)
        for candidate in candidates:
            # Constant-time for each candidate; no early exit on the first mismatch either.
            matched &= hmac.compare_digest(candidate, self._token)
        return matched

    async def read_push(self, request: Request) -> Push:
        """Check the media type and size, read the body while streaming, and parse it."""
        if not _is_json_media_type(request.headers.get("content-type")):
            raise PushRejected(415, "Content-Type must be application/json")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                raise PushRejected(400, "invalid Content-Length")
            if int(declared) > MAX_BODY_BYTES:
                raise PushRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with aclosing(request.stream()) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:  # chunked or lying Content-Length: stop reading
                        raise PushRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
        except ClientDisconnect:
            raise PushRejected(400, "client disconnected before the body ended") from None
        return parse_push(b"".join(chunks))

    # --- effect ---------------------------------------------------------------------

    def apply(self, push: Push) -> bool:
        """Store the push (blocking); settle the message when it carries a final status."""
        stored = self.engine().cache.store(push.message_id, push.status, source="push", ts=push.ts)
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
            async with self.gate.slot(final=push.status.is_final):
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
        except Exception:  # any failure to reach Redis (or to build the engine) is "down"
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


def create_app(
    settings: Settings | None = None,
    *,
    celery_app: Celery | None = None,
    engine: Engine | None = None,
    settle: Callable[[str], None] | None = None,
) -> Starlette:
    """Build the webhook ASGI app; ``app.state.receiver`` is its :class:`WebhookReceiver`.

    ``celery_app``: a Celery app that called :func:`smsbat_tracker.init_app` (the
    project's own); the receiver uses its tracker's settings (unless ``settings`` are
    given) and engine, and the callbacks go out through it. Without it, the package's own
    app (:mod:`smsbat_tracker.worker`) is used and ``settings`` default to
    :func:`~smsbat_tracker.config.load_settings`.

    Raises :class:`ConfigError` naming ``SMSBAT_WEBHOOK_TOKEN`` when no token is set and
    ``SMSBAT_WEBHOOK_OPEN`` is not true, and :class:`~smsbat_tracker.errors.NotInitialised`
    for a ``celery_app`` without the tracker. ``settle`` is called with the id of each
    newly stored final status; by default it ends that message's tracking in this process
    (:func:`smsbat_tracker.celery.tasks.settle_from_cache`).

    Its routes are relative: mounted at ``/smsbat`` (Starlette's or FastAPI's
    ``app.mount("/smsbat", webhook)``) they answer at ``/smsbat/webhook``. A mounted app's
    lifespan does not run: the receiver then connects on its first request, or in the
    host's lifespan through ``webhook.state.receiver.lifespan()``.
    """
    if settings is None and celery_app is None:
        settings = load_settings(credentials=False)
    receiver = WebhookReceiver(settings, celery_app=celery_app, engine=engine, settle=settle)
    if receiver.open:
        log.warning(
            "webhook.open",
            detail="SMSBAT_WEBHOOK_OPEN is set and no SMSBAT_WEBHOOK_TOKEN: every push is "
            "accepted without authentication; use only for local tests",
        )

    application = Starlette(
        routes=[
            Route("/webhook", receiver.webhook, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
            Route("/metrics", receiver.serve_metrics, methods=["GET"]),
            Route("/openapi.json", receiver.openapi, methods=["GET"]),
        ],
        lifespan=receiver.lifespan,
    )
    application.state.receiver = receiver
    return application


# --------------------------------------------------------------------- OpenAPI


def _answer(description: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/openapi.json``, its schemas from the models
    the receiver validates and answers with; ``root_path``, the prefix the receiver is
    mounted at, becomes its server URL."""
    servers = {"servers": [{"url": root_path}]} if root_path else {}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smsbat-tracker webhook",
            "version": "1",
            "description": "Receives SMSBAT delivery-status pushes.",
        },
        **servers,
        "paths": {
            "/webhook": {
                "post": {
                    "operationId": "pushStatus",
                    "summary": "Receive one status change pushed by SMSBAT",
                    "parameters": [
                        {
                            "name": TOKEN_QUERY,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "the shared secret (SMSBAT_WEBHOOK_TOKEN)",
                        },
                        {
                            "name": TOKEN_HEADER,
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "the shared secret, as an alternative to the query",
                        },
                    ],
                    "security": [{"queryToken": []}, {"headerToken": []}],
                    "requestBody": {
                        "required": True,
                        "description": f"at most {MAX_BODY_BYTES} bytes",
                        "content": {"application/json": {"schema": PushBody.model_json_schema()}},
                    },
                    "responses": {
                        "200": _answer(
                            "accepted: stored, or ignored as a duplicate or stale push", Accepted
                        ),
                        "400": _answer("not a UTF-8 JSON object, or bad Content-Length", Rejection),
                        "401": _answer("missing or wrong token", Unauthorized),
                        "413": _answer(f"body larger than {MAX_BODY_BYTES} bytes", Rejection),
                        "415": _answer("Content-Type is not application/json", Rejection),
                        "422": _answer("a field is missing or invalid", Rejection),
                        "503": _answer("Redis is unreachable; retry later", Rejection),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether Redis answers",
                    "responses": {
                        "200": _answer("Redis answers PING", Health),
                        "503": _answer("Redis is unreachable", Health),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "the OpenAPI document"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "queryToken": {"type": "apiKey", "in": "query", "name": TOKEN_QUERY},
                "headerToken": {"type": "apiKey", "in": "header", "name": TOKEN_HEADER},
            }
        },
    }


# --------------------------------------------------------------------- serving


class _RedactAccessLog(logging.Filter):
    """Scrubs ``?token=`` from uvicorn's access lines, which uvicorn formats itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_text(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def _protect_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactAccessLog) for f in access.filters):
        access.addFilter(_RedactAccessLog())


class LazyWebhookApp:
    """ASGI app that builds the webhook from the environment at lifespan start-up.

    Importing it never raises. A :class:`ConfigError` at start-up is reported to the server
    as ``lifespan.startup.failed`` with one line naming the variable (uvicorn logs it and
    exits), then raised. Served without lifespan, the app is built on the first request,
    and a configuration error answers 503 (logged once per request) instead of a traceback.
    """

    def __init__(self, factory: Callable[[], Starlette] = create_app) -> None:
        self._factory = factory
        self._app: Starlette | None = None
        self._lock = threading.Lock()

    def build(self) -> Starlette:
        """The webhook app, built on first call; raises :class:`ConfigError`."""
        with self._lock:
            if self._app is None:
                _protect_access_log()
                self._app = self._factory()
            return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection or the lifespan protocol."""
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        try:
            application = self.build()
        except ConfigError as exc:
            log.error("webhook.config_error", error=str(exc))
            if scope["type"] == "http":
                await JSONResponse({"error": "unavailable", "field": None}, 503)(
                    scope, receive, send
                )
            return
        await application(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup = await receive()
        try:
            application = self.build()
        except ConfigError as exc:
            await send(
                {"type": "lifespan.startup.failed", "message": f"smsbat-tracker webhook: {exc}"}
            )
            raise
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        # The built app runs the rest of the protocol (its shutdown closes its connections).
        await application(scope, replay, send)


def _from_environment() -> Starlette:
    """Settings from the environment, the project's (redacting) logging, then the app."""
    settings = load_settings(credentials=False)
    configure_logging(
        secrets=[settings.webhook_token.get_secret_value() if settings.webhook_token else None]
    )
    return create_app(settings)


app = LazyWebhookApp(_from_environment)
"""The module-level app for ``uvicorn smsbat_tracker.webhook:app``; built at start-up."""


def main(argv: Sequence[str] | None = None) -> int:
    """``smsbat-tracker webhook [--host H] [--port P]``: serve in the foreground.

    Prints one line and returns 2 on a configuration error.
    """
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="smsbat-tracker webhook",
        description="Serve the SMSBAT webhook receiver.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="log level (default %(default)s)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings(credentials=False)
        configure_logging(
            level=args.log_level.upper(),
            secrets=[settings.webhook_token.get_secret_value() if settings.webhook_token else None],
        )
        application = create_app(settings)
    except ConfigError as exc:
        print(f"smsbat-tracker webhook: {exc}", file=sys.stderr)
        return 2
    _protect_access_log()
    # log_config=None: uvicorn's own lines go through the project's (redacting) handler.
    config = uvicorn.Config(
        application,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
