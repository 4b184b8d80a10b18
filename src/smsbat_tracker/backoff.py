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
    "RETRY_FACTOR",
    "RETRY_FIRST",
    "RETRY_MAX",
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
# about the message: it is retried on its own short backoff, the provider's example (1 s,
# 2 s, 4 s), without spending a step of the schedule.
RETRY_FIRST: Final = 1.0
RETRY_FACTOR: Final = 2.0
RETRY_MAX: Final = 4.0


def compute_backoff(
    attempt: int,
    *,
    first_delay: float = DEFAULT_FIRST_DELAY,
    factor: float = DEFAULT_BACKOFF_FACTOR,
    max_delay: float = DEFAULT_MAX_DELAY,
    jitter: float = DEFAULT_JITTER,
    rng: Callable[[], float] = random.random,
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
    first: float = RETRY_FIRST,
    factor: float = RETRY_FACTOR,
    max_delay: float = RETRY_MAX,
) -> float:
    """Seconds to wait after ``failures`` failed requests in a row (1 after the first).

    ``first * factor ** (failures - 1)``, capped at ``max_delay``, and never shorter than
    the API's ``retry_after``.
    """
    if failures < 1:
        raise ValueError("failures must be >= 1")
    wait = min(max_delay, first * factor ** min(failures - 1, 64))
    return max(wait, retry_after or 0.0)


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

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The backoff before check number ``attempt``."""
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
        rng: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds until the next check, or ``None`` once the deadline has come.

        The backoff is stretched to honour ``retry_after`` and the minimum interval since
        ``last_check_at``, and cut so that the last wait lands exactly on the deadline,
        where the final check happens.
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
