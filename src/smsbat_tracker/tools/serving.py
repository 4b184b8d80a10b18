"""Serving ASGI apps with uvicorn: in a background thread (tests, demo) or in the foreground.

Used by the sandbox API and the webhook receiver. uvicorn runs with httptools and uvloop
when installed (``uvicorn[standard]``), without access logs or lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

__all__ = [
    "ASGIApp",
    "BackgroundServer",
    "ReadyServer",
    "Receive",
    "Scope",
    "Send",
    "bind_socket",
    "serve_on",
    "uvicorn_config",
]

# ASGI types, spelled out so the module needs no extra dependency for them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def uvicorn_config(
    app: ASGIApp, *, log_config: bool, lifespan: Literal["on", "off"] = "off"
) -> uvicorn.Config:
    """uvicorn settings for serving ``app`` fast: httptools, uvloop, no access log."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - uvicorn[standard] ships it
        http = "auto"
    else:
        http = "httptools"
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - not available on Windows
        loop = "asyncio"
    else:
        loop = "uvloop"
    kwargs: dict[str, Any] = {"log_level": logging.WARNING}
    if not log_config:
        # In-process use must not reconfigure the host application's logging or log levels.
        kwargs = {"log_config": None, "log_level": None}
    return uvicorn.Config(
        app,
        http=http,
        loop=loop,
        lifespan=lifespan,
        access_log=False,
        timeout_graceful_shutdown=2,
        **kwargs,
    )


class ReadyServer(uvicorn.Server):
    """uvicorn.Server that reports the end of its start-up through a threading.Event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_on(
    server: ReadyServer,
    sock: socket.socket,
    on_start: Callable[[asyncio.AbstractEventLoop], None] | None,
    on_stop: Callable[[], Awaitable[None]] | None,
) -> None:
    if on_start is not None:
        on_start(asyncio.get_running_loop())
    try:
        await server.serve(sockets=[sock])
    finally:
        if on_stop is not None:
            await on_stop()


class BackgroundServer:
    """Serve any ASGI app with uvicorn on a daemon thread (used for the sandbox and tests).

    The socket is bound in :meth:`start`, so with ``port=0`` the chosen port is known at once;
    :meth:`start` returns when uvicorn accepts connections.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        on_start: Callable[[asyncio.AbstractEventLoop], None] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        lifespan: Literal["on", "off"] = "off",
    ) -> None:
        self.app = app
        self.lifespan: Literal["on", "off"] = lifespan
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._on_start = on_start
        self._on_stop = on_stop
        self._server: ReadyServer | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind, start uvicorn on a daemon thread and wait until it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn_config(self.app, log_config=False, lifespan=self.lifespan)
        server = ReadyServer(config)
        loop_factory = config.get_loop_factory()

        def run() -> None:
            try:
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    runner.run(serve_on(server, sock, self._on_start, self._on_stop))
            except BaseException as exc:  # reported by start()/stop() in the caller's thread
                self._error = exc
            finally:
                sock.close()
                server.ready.set()

        self._server = server
        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        if not server.ready.wait(self.startup_timeout) or not server.started:
            self.stop()
            raise RuntimeError(f"server on {self.url} did not start") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread; idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
