"""Webhook pushes: each status change of a message POSTed to ``push_url`` when it happens.

Pushes are timers on the server's event loop (bound by :meth:`Pusher.attach_loop`); those of
messages created before a loop is bound wait for it. Each outcome is recorded on the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp

from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.sandbox.messages import Message

__all__ = ["Pusher"]

log = logging.getLogger(__name__)


def _iso_utc(epoch: float) -> str:
    # Second precision with a Z suffix, exactly like the provider's documented example.
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Pusher:
    """The webhook pushes of one sandbox's messages.

    ``lock`` is the state's lock: it guards the loop binding, the pending pushes and each
    message's push records. ``config`` returns the configuration in force (its ``push_url``
    may change while the sandbox runs).
    """

    def __init__(self, lock: threading.Lock, config: Callable[[], SandboxConfig]) -> None:
        self._lock = lock
        self._config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: list[tuple[Message, int]] = []
        self._generation = 0

    def forget(self) -> None:
        """Drop pending and scheduled pushes (the messages are forgotten); lock held."""
        self._generation += 1
        self._pending.clear()

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the event loop that sends webhooks; called on that loop's thread."""
        with self._lock:
            if self.loop is not loop:
                # A client session cannot move between loops; the next push creates a new one.
                self._client = None
            self.loop = loop
            self._loop_thread = threading.get_ident()
            pending = self._pending
            self._pending = []
        for message, generation in pending:
            self._schedule(message, generation)

    def after_create(self, messages: list[Message]) -> None:
        """Schedule the pushes of new messages (from any thread; lock not held)."""
        if self._config().push_url is None or not messages:
            return
        with self._lock:
            generation = self._generation
            loop = self.loop
            if loop is None or loop.is_closed():
                self._pending.extend((message, generation) for message in messages)
                return
            on_loop = self._loop_thread == threading.get_ident()
        if on_loop:
            for message in messages:
                self._schedule(message, generation)
            return
        # RuntimeError: the loop closed in between, the server is gone and nothing is pushed.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._schedule_many, messages, generation)

    def _schedule_many(self, messages: list[Message], generation: int) -> None:
        for message in messages:
            self._schedule(message, generation)

    def _schedule(self, message: Message, generation: int) -> None:
        # Runs on the loop thread.
        loop = self.loop
        if loop is None:
            return
        now = time.time()
        for status, at in message.changes():
            loop.call_later(max(0.0, at - now), self._fire, message, status, at, generation)

    def _fire(self, message: Message, status: str, at: float, generation: int) -> None:
        if generation != self._generation or self.loop is None:
            return  # reset() since scheduling: the message is forgotten
        task = self.loop.create_task(self._push(message, status, at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, message: Message, status: str, at: float) -> None:
        config = self._config()
        url = config.push_url
        if url is None:
            return
        if self._client is None:
            # One pooled client for all pushes, on aiohttp: a tenth of httpx's CPU per request,
            # which counts when the sandbox shares a machine with what it serves. The timeout
            # covers the request, not the wait for a connection: a burst of status changes
            # may queue far more pushes than there are connections.
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=config.push_timeout,
                    sock_read=config.push_timeout,
                ),
            )
        payload = {
            "messageId": message.message_id,
            "deliverystatus": status,
            "timestamp": _iso_utc(at),
            "cost": message.cost if status == "delivered" else 0.0,
        }
        sent_at = time.time()
        record: dict[str, object] = {"deliverystatus": status, "sent_at": sent_at}
        try:
            async with self._client.post(url, json=payload) as response:
                await response.read()
            record["http_status"] = response.status
            record["error"] = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed push must never disturb the sandbox
            log.debug("push of %s for %s to %s failed: %r", status, message.message_id, url, exc)
            record["http_status"] = None
            record["error"] = type(exc).__name__
        with self._lock:
            message.pushes.append(record)

    async def aclose(self) -> None:
        """Cancel in-flight pushes and close the push client; run on the loop at shutdown."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        with self._lock:
            self.loop = None
            self._loop_thread = None
