"""A check waits a moment for the API's answer, not for its read timeout.

A status request runs in a thread of this process's own (:class:`LateAnswers`); the run
waits at most ``SMSBAT_ANSWER_WAIT`` for it. A later answer is not lost: when it comes it
is cached like any other, and the run after (1 s later) reads it there instead of asking
again. So a slow answer holds a worker process for the wait, not for
``SMSBAT_READ_TIMEOUT``: a default prefork worker of two processes is not starved when the
provider is slow for some requests (``bench/RESULTS.md``, "Slow answers").

The wait follows the provider's own pace (:func:`wait_for_answers`): once a process has
seen :data:`SAMPLES_MIN` answers, it waits :data:`WAIT_FACTOR` times the 95th percentile
of its recent ones, never less than :data:`WAIT_MIN` and never more than
``SMSBAT_ANSWER_WAIT``. An answer that rarely takes more than 50 ms is given up on after
0.25 s; one whose usual time is 0.3 s is waited for up to the setting, as before. Only
answers count: a request that timed out or failed to connect says nothing of the pace.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Final, TypeVar

from smsbat_tracker.errors import AnswerLate
from smsbat_tracker.log import get_logger

__all__ = [
    "LATE_THREADS",
    "SAMPLES_KEPT",
    "SAMPLES_MIN",
    "WAIT_FACTOR",
    "WAIT_MIN",
    "LateAnswers",
    "wait_for_answers",
]

log = get_logger(__name__)

# Requests a process keeps in flight at once. More wait their turn (counted in their
# wait): with one answer in twenty at the read timeout, a process at 50 checks/s has about
# eight in flight.
LATE_THREADS: Final = 32

# The adaptive wait (see the module's docstring). The floor keeps a busy machine's thread
# and GIL delays (tens of ms) from turning answers on time into late ones.
WAIT_MIN: Final = 0.25
WAIT_FACTOR: Final = 4.0
# Answers a process keeps the time of, and how many it needs before it adapts (before:
# the setting). The wait is worked out again every SAMPLES_MIN answers.
SAMPLES_KEPT: Final = 256
SAMPLES_MIN: Final = 32

T = TypeVar("T")


def wait_for_answers(durations: Sequence[float], most: float) -> float:
    """How long to wait for an answer, given the seconds ``durations`` of recent answers
    and the longest wait ``most`` (``SMSBAT_ANSWER_WAIT``). Pure."""
    if len(durations) < SAMPLES_MIN:
        return most
    ranked = sorted(durations)
    p95 = ranked[min(len(ranked) - 1, math.ceil(0.95 * len(ranked)) - 1)]
    return min(most, max(WAIT_MIN, WAIT_FACTOR * p95))


class LateAnswers:
    """This process's status requests, each waited for a moment (fork-safe: a child makes
    its own threads)."""

    def __init__(self, most: float) -> None:
        self.most = most
        # What a run waits now: the setting until enough answers were timed.
        self.wait = most
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=SAMPLES_KEPT)
        self._since = 0

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # A pool inherited over a fork has no threads in this process: a new one.
                self._pool = ThreadPoolExecutor(LATE_THREADS, thread_name_prefix="smsbat-ask")
                self._pid = os.getpid()
            return self._pool

    def observe(self, seconds: float) -> None:
        """One answer took ``seconds`` from its request's submission (queueing included:
        the run waits for that too)."""
        with self._lock:
            self._durations.append(seconds)
            self._since += 1
            if self._since >= SAMPLES_MIN:
                self._since = 0
                self.wait = wait_for_answers(self._durations, self.most)

    def get(self, fetch: Callable[[], T], keep: Callable[[T], None]) -> T:
        """``fetch()``'s answer within :attr:`wait` seconds; else :class:`AnswerLate`, and
        ``keep(answer)`` runs when it comes (its failure is dropped: the run retries)."""
        submitted = time.monotonic()

        def timed() -> T:
            answer = fetch()  # raises on a timeout or an error: not timed
            self.observe(time.monotonic() - submitted)
            return answer

        wait = self.wait
        future = self._executor().submit(timed)
        try:
            return future.result(timeout=wait)
        except FutureTimeout:
            future.add_done_callback(lambda done: _keep(done, keep))
            raise AnswerLate(
                f"no answer within {wait:g} s (SMSBAT_ANSWER_WAIT {self.most:g} s at most);"
                " it is cached when it comes",
                wait=wait,
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
