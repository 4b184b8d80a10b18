"""The polling schedule: pure functions, no I/O, no clock of their own."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from smsbat_tracker.config import Settings

__all__ = [
    "DEFAULT_BACKOFF_FACTOR",
    "DEFAULT_FIRST_DELAY",
    "DEFAULT_JITTER",
    "DEFAULT_MAX_DELAY",
    "MIN_INTERVAL",
    "RETRY_BACKOFF_AFTER",
    "RETRY_MAX",
    "RETRY_WAIT",
    "Rng",
    "Schedule",
    "compute_backoff",
    "retry_backoff",
]

# The provider advises checks every 5-10 s with exponential backoff; the defaults start at
# 5 s and grow by 1.5x to 10 s, tuned with bench/ (see bench/RESULTS.md): about 0.6x the
# calls of a fixed 5 s loop with a p95 detection delay under 10 s.
DEFAULT_FIRST_DELAY: Final = 5.0
DEFAULT_BACKOFF_FACTOR: Final = 1.5
DEFAULT_MAX_DELAY: Final = 10.0
DEFAULT_JITTER: Final = 0.1
# Never two status requests for one message within a second (the provider's rule).
MIN_INTERVAL: Final = 1.0
# A failed request (a network error, a timeout, 5xx, 429, a malformed body) says nothing
# about the message: it is retried after RETRY_WAIT, the provider's one-second minimum per
# message, without spending a step of the schedule. Only an API that keeps failing (more
# than RETRY_BACKOFF_AFTER failures in a row) is backed off, doubling up to RETRY_MAX. The
# global rate limit, not a per-message backoff, bounds what the tracker asks of a failing
# API; a longer wait per message only makes its outcome late (bench/RESULTS.md: with half
# the requests failing, runs of ten failures in a row happen, and a 1-2-4 s backoff gave
# outcomes up to 36 s late).
RETRY_WAIT: Final = 1.0
RETRY_BACKOFF_AFTER: Final = 16
RETRY_MAX: Final = 10.0

# Where jitter comes from: a draw in [0, 1), e.g. the ``random`` method of a
# ``random.Random`` the caller owns (seeded in tests), never the global ``random``.
Rng = Callable[[], float]


def compute_backoff(
    attempt: int,
    *,
    first_delay: float = DEFAULT_FIRST_DELAY,
    factor: float = DEFAULT_BACKOFF_FACTOR,
    max_delay: float = DEFAULT_MAX_DELAY,
    jitter: float = DEFAULT_JITTER,
    # A public helper (the package root exports it): its default stays for callers outside
    # the tracker; the tracker's own code always passes its ``rng``.
    rng: Rng = random.random,
) -> float:
    """Seconds to wait before check number ``attempt`` (0 is the first check).

    ``first_delay * factor ** attempt``, capped at ``max_delay``, then spread by up to
    ``±jitter`` of itself so that messages sent together do not poll in lockstep; the
    result never exceeds ``max_delay``.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # Cap the exponent first: factor ** attempt overflows long before attempts run out.
    base = first_delay if factor == 1 else min(max_delay, first_delay * factor ** min(attempt, 64))
    spread = base * jitter * (2.0 * rng() - 1.0)
    return max(0.0, min(max_delay, base + spread))


def retry_backoff(
    failures: int,
    *,
    retry_after: float | None = None,
    wait: float = RETRY_WAIT,
    backoff_after: int = RETRY_BACKOFF_AFTER,
    max_delay: float = RETRY_MAX,
) -> float:
    """Seconds to wait after ``failures`` failed requests in a row (1 after the first).

    ``wait`` for the first ``backoff_after`` failures, then doubling with each one more,
    capped at ``max_delay``; never shorter than the API's ``retry_after``.
    """
    if failures < 1:
        raise ValueError("failures must be >= 1")
    extra = min(max(failures - backoff_after, 0), 64)
    return max(min(max_delay, wait * 2.0**extra), retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When to check a message next, given how far its tracking has come."""

    first_delay: float = DEFAULT_FIRST_DELAY
    factor: float = DEFAULT_BACKOFF_FACTOR
    max_delay: float = DEFAULT_MAX_DELAY
    jitter: float = DEFAULT_JITTER
    min_interval: float = MIN_INTERVAL

    @classmethod
    def from_settings(cls, settings: Settings) -> Schedule:
        """The schedule the settings describe."""
        return cls(
            first_delay=settings.first_delay,
            factor=settings.backoff_factor,
            max_delay=settings.max_delay,
            jitter=settings.jitter,
            min_interval=settings.min_interval,
        )

    def delay(self, attempt: int, rng: Rng) -> float:
        """The backoff before check number ``attempt``, its jitter drawn from ``rng``."""
        return compute_backoff(
            attempt,
            first_delay=self.first_delay,
            factor=self.factor,
            max_delay=self.max_delay,
            jitter=self.jitter,
            rng=rng,
        )

    def next_wait(
        self,
        *,
        now: float,
        deadline_at: float,
        attempt: int,
        last_check_at: float | None = None,
        retry_after: float | None = None,
        rng: Rng,
    ) -> float | None:
        """Seconds until the next check, or ``None`` once the deadline has come.

        The backoff is stretched to honour ``retry_after`` and the minimum interval since
        ``last_check_at``, and cut so that the last wait lands exactly on the deadline,
        where the final check happens. The jitter is drawn from ``rng``.
        """
        remaining = deadline_at - now
        if remaining <= 0:
            return None
        wait = self.delay(attempt, rng)
        if retry_after is not None:
            wait = max(wait, retry_after)
        if last_check_at is not None:
            wait = max(wait, self.min_interval - (now - last_check_at))
        return min(wait, remaining)
