"""A batch's requests, concurrent on one event loop that outlives the ticks.

The async batch client (aiohttp) keeps its connections between ticks on a loop of its own,
on a daemon thread: no new connection pool, and no new TLS handshakes, every batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from smsbat_tracker import metrics
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.errors import RequestTimeout, SmsbatError
from smsbat_tracker.provider.aioclient import BatchStatusClient
from smsbat_tracker.provider.models import MessageStatus

__all__ = ["STRAGGLER_WAIT", "BatchFetcher", "LoopThread"]

T = TypeVar("T")

# How long a batch waits for its last answers once every request has started: a slow
# answer is retried on its own short backoff rather than hold the whole batch (and its
# worker) for the read timeout.
STRAGGLER_WAIT: Final = 1.0


class LoopThread:
    """One event loop on a daemon thread per process, for the async batch client.

    aiohttp sessions belong to one loop; keeping the loop (and its connections) alive
    between ticks avoids a new connection pool, and new TLS handshakes, every batch.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        """Stop the loop and wait for the thread."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class BatchFetcher:
    """The batch client and its loop, made on first use and kept for the process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._loop: LoopThread | None = None
        self._client: BatchStatusClient | None = None
        self._lock = threading.Lock()

    def _runtime(self) -> tuple[LoopThread, BatchStatusClient]:
        with self._lock:
            if self._loop is None:
                self._loop = LoopThread()
            if self._client is None:
                settings = self.settings

                async def make() -> BatchStatusClient:
                    return BatchStatusClient.from_settings(
                        settings, max_connections=settings.campaign_concurrency
                    )

                self._client = self._loop.run(make())
            return self._loop, self._client

    def close(self) -> None:
        """Close the batch client and its loop."""
        with self._lock:
            if self._loop is not None:
                if self._client is not None:
                    self._loop.run(self._client.aclose())
                self._loop.stop()
            self._loop = self._client = None

    def fetch(self, ids: list[str], wait: float) -> dict[str, MessageStatus | SmsbatError]:
        """Ask the API for ``ids``, whose tokens come due one interval apart, the last
        after ``wait``: each slice is sent when its tokens are due, at the limit's pace.

        A straggler does not hold the batch: once every request has started, the batch
        waits at most :data:`STRAGGLER_WAIT` for the last answers; a request still open
        then is cancelled and counts as failed (retried on its own short backoff).
        """
        limiter, settings = self.engine.limiter, self.settings
        loop, client = self._runtime()

        async def fetch_all() -> dict[str, MessageStatus | SmsbatError]:
            gate = asyncio.Semaphore(settings.campaign_concurrency)
            started = [0, time.monotonic()]  # how many started, when the last did

            async def one(message_id: str) -> MessageStatus | SmsbatError:
                async with gate:
                    started[0] += 1
                    started[1] = time.monotonic()
                    try:
                        return await client.get_status(message_id)
                    except SmsbatError as exc:
                        return exc

            step = limiter.burst if limiter.enabled else len(ids)
            begin = time.monotonic()
            tasks: dict[str, asyncio.Task[MessageStatus | SmsbatError]] = {}
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                if limiter.enabled:
                    later = (len(ids) - start - len(chunk)) / limiter.rate
                    delay = wait - later - (time.monotonic() - begin)
                    if delay > 0:
                        await asyncio.sleep(delay)
                for m in chunk:
                    tasks[m] = asyncio.ensure_future(one(m))
            pending = set(tasks.values())
            while pending:
                _, pending = await asyncio.wait(pending, timeout=STRAGGLER_WAIT / 4)
                if started[0] == len(ids) and time.monotonic() - started[1] > STRAGGLER_WAIT:
                    break
            late = RequestTimeout(f"no answer within {STRAGGLER_WAIT:g} s; the batch went on")
            results: dict[str, MessageStatus | SmsbatError] = {}
            for m, task in tasks.items():
                if task in pending:
                    task.cancel()
                    results[m] = late
                    metrics.get().api_network_error()
                else:
                    results[m] = task.result()
            return results

        return loop.run(fetch_all())
