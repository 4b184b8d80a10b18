"""A check waits a moment for the API's answer, not for its read timeout.

A status request runs in a thread of this process's own (:class:`LateAnswers`); the run
waits at most ``SMSBAT_ANSWER_WAIT`` for it. A later answer is not lost: when it comes it
is cached like any other, and the run after (1 s later) reads it there instead of asking
again. So a slow answer holds a worker process for the wait, not for
``SMSBAT_READ_TIMEOUT``: a default prefork worker of two processes is not starved when the
provider is slow for some requests (``bench/RESULTS.md``, "Slow answers").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Final, TypeVar

from smsbat_tracker.errors import AnswerLate
from smsbat_tracker.log import get_logger

__all__ = ["LATE_THREADS", "LateAnswers"]

log = get_logger(__name__)

# Requests a process keeps in flight at once. More wait their turn (counted in their
# wait): with one answer in twenty at the read timeout, a process at 50 checks/s has about
# eight in flight.
LATE_THREADS: Final = 32

T = TypeVar("T")


class LateAnswers:
    """This process's status requests, each waited for a moment (fork-safe: a child makes
    its own threads)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # A pool inherited over a fork has no threads in this process: a new one.
                self._pool = ThreadPoolExecutor(LATE_THREADS, thread_name_prefix="smsbat-ask")
                self._pid = os.getpid()
            return self._pool

    def get(self, fetch: Callable[[], T], keep: Callable[[T], None]) -> T:
        """``fetch()``'s answer within :attr:`wait` seconds; else :class:`AnswerLate`, and
        ``keep(answer)`` runs when it comes (its failure is dropped: the run retries)."""
        future = self._executor().submit(fetch)
        try:
            return future.result(timeout=self.wait)
        except FutureTimeout:
            future.add_done_callback(lambda done: _keep(done, keep))
            raise AnswerLate(
                f"no answer within {self.wait:g} s (SMSBAT_ANSWER_WAIT); it is cached when it comes"
            ) from None

    def close(self) -> None:
        """Let the requests in flight finish in their threads; take no more."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)


def _keep(done: Future[T], keep: Callable[[T], None]) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # a failed late request: the run that gave up on it retries anyway
    try:
        keep(done.result())
    except Exception as exc:  # a callback thread: log, never raise into the pool
        log.warning("track.late_answer_lost", error=f"{type(exc).__name__}: {exc}"[:200])
