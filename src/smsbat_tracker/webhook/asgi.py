"""What ``uvicorn smsbat_tracker.webhook:app`` serves: the webhook built at start-up, not import.

:data:`app` reads its settings from the environment when the server starts, so that
importing it never raises; uvicorn's access lines, which carry the request's query, are
scrubbed of the token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from smsbat_tracker.config import load_settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import configure_logging, get_logger, redact_text
from smsbat_tracker.webhook.application import create_app

__all__ = ["LazyWebhookApp", "app", "protect_access_log"]

log = get_logger(__name__)


class _RedactAccessLog(logging.Filter):
    """Scrubs ``?token=`` from uvicorn's access lines, which uvicorn formats itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_text(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def protect_access_log() -> None:
    """Add the token-scrubbing filter to uvicorn's access logger, once."""
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
                protect_access_log()
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
