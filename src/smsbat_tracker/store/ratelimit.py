"""One rate limit for calls to the SMSBAT API, shared by every worker and process.

A GCRA token bucket in one Lua script on the Redis server's clock, so workers on several
machines agree. A 429 from the API pauses everyone briefly (its Retry-After, at most
:data:`PAUSE_MAX`, and at most a quarter of the time). When requests outrun the limit, or a
pause ends, they are served oldest first (a check at its deadline before any), across
tasks, campaign batches and processes. Celery's own ``rate_limit`` is per worker and can do
none of this.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any, Final

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.errors import RateLimited
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.scripts import Script

__all__ = [
    "DEFAULT_PAUSE",
    "LINE_WINDOW",
    "PAUSE_MAX",
    "PAUSE_SPACING",
    "RESERVE_AHEAD",
    "TICKET_GRACE",
    "WAITER_GRACE",
    "Pause",
    "RateLimiter",
    "Reserve",
    "pause_for",
]

# Pause after a 429 that carries no Retry-After.
DEFAULT_PAUSE: Final = 1.0
# The longest a 429 pauses every caller: the provider's limit is per account, but one
# message's 429 must not stop every tracker for long (the message itself waits out its
# Retry-After on its own backoff).
PAUSE_MAX: Final = 1.0
# A pause starts at most once in this many times its length: a stream of 429s (one
# request in ten, say) stops every caller at most a quarter of the time.
PAUSE_SPACING: Final = 4

log = get_logger(__name__)

# The scripts that book tokens in the same round trip as other work (a tracking's turn, a
# campaign's batch) include lua/lib/reserve.lua (reserve(K, A): what K and A hold, and why
# the line is fair) and lua/lib/adjust.lua (unreserve, pause) themselves.


class Reserve(Script):
    """``ratelimit_reserve.lua``: book tokens; ``(booked, wait_us)``."""

    file = "ratelimit_reserve.lua"

    def __call__(self, keys: Sequence[str], args: list[Any]) -> tuple[bool, int]:
        booked, wait_us = self.run(keys, args)
        return bool(booked), int(wait_us)


class Pause(Script):
    """``ratelimit_pause.lua``: pause every caller; False when a pause began too recently."""

    file = "ratelimit_pause.lua"

    def __call__(self, bucket: str, pause_key: str, ms: int) -> bool:
        return bool(self.run([bucket, pause_key], [ms]))


# How long a turned-away caller may be late to ask again before its place is given up
# (a task's retry waits behind others in its worker; a dead one never asks again).
WAITER_GRACE: Final = 2.0
# How far ahead acquire() books tokens.
RESERVE_AHEAD: Final = 1.0
# How far ahead tokens are kept for the callers waiting in line (or the caller's own wait,
# when longer).
LINE_WINDOW: Final = 1.0
# A tracking first in line books its token up to LINE_WINDOW ahead, beyond its run's own
# wait, and its next run comes for it (session_before.lua's ticket): a run that comes
# more than this late asks again, in its place in the line.
TICKET_GRACE: Final = 1.0


class RateLimiter:
    """Blocks (or awaits) until the global request budget allows ``n`` more calls."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        keys: Keys | None = None,
        *,
        rate: float | None = None,
        burst: float | None = None,
    ) -> None:
        self.rate = settings.rate_limit if rate is None else rate
        keys = keys or Keys(settings.key_prefix)
        self._keys: tuple[str, str, str, str] = (
            keys.rate_limit(),
            keys.rate_pause(),
            keys.rate_waiters(),
            keys.rate_waiters_back(),
        )
        self._redis = client
        self._reserve = Reserve(client)
        self._pause = Pause(client)
        self._interval_us = 1_000_000 / self.rate if self.rate > 0 else 0.0
        # Allow a burst of a twentieth of a second's budget (at least one request).
        burst = max(1.0, self.rate / 20) if burst is None else burst
        self._tolerance_us = self._interval_us * max(burst - 1, 0)

    @property
    def burst(self) -> int:
        """The most tokens granted at once."""
        if not self.enabled:
            return 1
        return max(1, math.floor(self._tolerance_us / self._interval_us) + 1)

    @property
    def enabled(self) -> bool:
        """False when the limit is off (``SMSBAT_RATE_LIMIT=0``)."""
        return self.rate > 0

    def try_acquire(self, n: int = 1) -> float:
        """Take ``n`` tokens now and return 0, or return seconds to wait and take none."""
        booked, wait = self.reserve(n, ahead=0.0)
        return 0.0 if booked else wait

    @property
    def keys(self) -> tuple[str, str, str, str]:
        """The KEYS of ``ratelimit_reserve.lua`` (and ``reserve(K, A)``'s K), in order."""
        return self._keys

    def script_args(
        self, n: int, *, ahead: float, waiter: str = "", due_at: float | None = None
    ) -> list[Any]:
        """The ARGV of ``ratelimit_reserve.lua`` (and ``reserve(K, A)``'s A), in order."""
        return [
            repr(self._interval_us),
            repr(self._tolerance_us),
            n,
            int(ahead * 1_000_000),
            waiter,
            "" if due_at is None else int(due_at * 1_000_000),
            int(WAITER_GRACE * 1_000_000),
            int(LINE_WINDOW * 1_000_000),
        ]

    def reserve(
        self,
        n: int = 1,
        *,
        ahead: float = RESERVE_AHEAD,
        waiter: str = "",
        due_at: float | None = None,
    ) -> tuple[bool, float]:
        """Book ``n`` tokens at most ``ahead`` seconds in the future.

        ``(True, wait)``: they are yours once ``wait`` seconds have passed.
        ``(False, wait)``: nothing was booked; ask again in ``wait`` seconds.

        Requests are served oldest first: ``due_at`` (epoch seconds, default now) is when
        the caller's request fell due, and a named ``waiter`` that is turned away keeps
        its place in the line until it asks again (or is :data:`WAITER_GRACE` late).
        """
        if not self.enabled:
            return True, 0.0
        if n < 1:
            raise ValueError("n must be >= 1")
        booked, wait_us = self._reserve(
            self._keys, self.script_args(n, ahead=ahead, waiter=waiter, due_at=due_at)
        )
        return booked, wait_us / 1_000_000

    def acquire(self, n: int = 1) -> None:
        """Block until ``n`` calls are allowed."""
        for chunk in self._chunks(n):
            while True:
                booked, wait = self.reserve(chunk)
                if wait > 0:
                    time.sleep(wait)
                if booked:
                    break

    async def acquire_async(self, n: int = 1) -> None:
        """Await until ``n`` calls are allowed (the Redis call itself is brief and sync)."""
        for chunk in self._chunks(n):
            while True:
                booked, wait = self.reserve(chunk)
                if wait > 0:
                    await asyncio.sleep(wait)
                if booked:
                    break

    def _chunks(self, n: int) -> list[int]:
        if n < 1:
            raise ValueError("n must be >= 1")
        # More tokens than the burst allows would never be granted at once: take slices.
        if not self.enabled:
            return []
        most = self.burst
        return [most] * (n // most) + ([n % most] if n % most else [])

    def pause(self, seconds: float) -> None:
        """Stop every caller for ``seconds`` (after a 429), unless a pause began less than
        :data:`PAUSE_SPACING` times its length ago."""
        ms = max(1, int(seconds * 1000))
        if self._pause(self._keys[0], self._keys[1], ms):
            log.warning("ratelimit.pause", seconds=round(seconds, 3))

    @property
    def interval_us(self) -> float:
        """The emission interval, in microseconds (what ``unreserve`` takes)."""
        return self._interval_us

    def observe_error(self, exc: BaseException) -> None:
        """Pause everyone when the API says it is rate limiting us."""
        seconds = pause_for(exc)
        if seconds is not None:
            self.pause(seconds)


def pause_for(exc: BaseException | object) -> float | None:
    """How long an API error pauses every caller: a 429's Retry-After, at most
    :data:`PAUSE_MAX`; None for any other error."""
    if isinstance(exc, RateLimited):
        return min(exc.retry_after if exc.retry_after is not None else DEFAULT_PAUSE, PAUSE_MAX)
    return None
