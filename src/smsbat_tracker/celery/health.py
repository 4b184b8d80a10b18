"""A worker's health: its Redis in reach and its re-driver beating.

A worker is healthy when a ``PING`` to its Redis answers within :data:`PING_TIMEOUT` and
its re-driver's last beat that reached Redis is at most :data:`STALE_AFTER` old: a worker
whose Redis is gone, frozen or misnamed (a Sentinel master nobody knows), or whose
re-driver thread died, answers unhealthy within 5 s, and healthy again once it beats.

The worker serves it as ``GET /healthz`` beside its metrics (``SMSBAT_METRICS_PORT``):
200 ``{"status": "ok"}``, or 503 ``{"status": "down", "problems": [...]}``. The
``smsbat-tracker health`` command asks the same from outside.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis

from smsbat_tracker.celery.redrive.bounds import HEARTBEAT
from smsbat_tracker.store.connections import one_try

__all__ = ["PING_TIMEOUT", "STALE_AFTER", "Health", "ping_options", "serve"]

# The re-driver beats each second; three missed beats, and the worker is not well.
STALE_AFTER: Final = 3 * HEARTBEAT
# A PING takes milliseconds; a frozen Redis is noticed this soon.
PING_TIMEOUT: Final = 2.0


def ping_options() -> dict[str, Any]:
    """The options of a client that answers health within 5 s: short timeouts, one try."""
    return {
        "socket_timeout": PING_TIMEOUT,
        "socket_connect_timeout": PING_TIMEOUT,
        "retry": one_try(),
    }


Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Health:
    """What ``/healthz`` answers: the problems of this worker, none when healthy."""

    def __init__(
        self, client: Callable[[], redis.Redis], last_beat: Callable[[], float | None]
    ) -> None:
        self._client = client  # built on first use: Redis may be away at start
        self._last_beat = last_beat  # monotonic time of the last beat that reached Redis

    def problems(self) -> list[str]:
        """One line per problem; empty when healthy."""
        found = []
        try:
            self._client().ping()
        except redis.RedisError as exc:
            found.append(f"redis: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        beat = self._last_beat()
        if beat is None:
            found.append("re-driver: no beat has reached Redis yet")
        elif (age := time.monotonic() - beat) > STALE_AFTER:
            found.append(f"re-driver: last beat {age:.1f} s ago")
        return found

    def wsgi(self, other: Wsgi) -> Wsgi:
        """A WSGI app answering ``/healthz`` and passing anything else to ``other``."""

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return other(environ, start_response)
            problems = self.problems()
            answer = {"status": "down", "problems": problems} if problems else {"status": "ok"}
            body = json.dumps(answer).encode()
            start_response(
                "503 Service Unavailable" if problems else "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]

        return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape or a health check each few seconds is not worth a log line


def serve(host: str, port: int, app: Wsgi) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``app`` on ``host:port`` from a daemon thread; raises OSError when the port
    cannot be bound."""

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="smsbat-metrics", daemon=True)
    thread.start()
    return server, thread
