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
from typing import Any, Final

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.errors import RateLimited
from smsbat_tracker.keys import Keys
from smsbat_tracker.log import get_logger

__all__ = [
    "ADJUST_LUA",
    "DEFAULT_PAUSE",
    "LINE_WINDOW",
    "PAUSE_MAX",
    "PAUSE_SPACING",
    "RESERVE_AHEAD",
    "RESERVE_LUA",
    "WAITER_GRACE",
    "RateLimiter",
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

# KEYS: bucket (theoretical arrival time, in microseconds), pause (when it ends, ms),
# waiters (scored by when their request fell due, us), waiters' expected return (us).
# ARGV: emission interval us, burst tolerance us, tokens wanted, how long the caller would
# wait for them (us), the caller's name ('' for one-off callers), when its request fell
# due (us; '' for now), how long a waiter may be late to ask again before it is forgotten
# (us), how far ahead tokens are kept for the waiters in line (us).
# Returns {1, wait}: the tokens are yours from ``wait`` us on; or {0, wait}: nothing was
# booked, ask again then.
# Fair: a caller is served only when the tokens of every waiter whose request fell due
# earlier fit in the line's window too, so the oldest requests go first whoever asks
# first (a task's retry and a campaign's batch alike), and a turned-away caller is told
# when its turn comes instead of racing everyone again at the next free token. A caller
# turned away by a pause takes its place in the line too: when the pause ends, the line
# goes in order. The window
# is wider than a caller's own wait, so that waiters who come back late (their worker was
# busy) hold up the line only when more than the window's worth of them are late.
RESERVE_LUA: Final = """
local function reserve(K, A)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local paused = (tonumber(redis.call('GET', K[2])) or 0) * 1000 - now
  local interval = tonumber(A[1])
  local tolerance = tonumber(A[2])
  local n = tonumber(A[3])
  local ahead = tonumber(A[4])
  local member = A[5]
  local due = tonumber(A[6]) or now
  local gone = redis.call('ZRANGEBYSCORE', K[4], '-inf', now, 'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', K[3], unpack(gone))
    redis.call('ZREM', K[4], unpack(gone))
  end
  if member ~= '' then
    local first = tonumber(redis.call('ZSCORE', K[3], member))
    if first and first < due then due = first end
  end
  local before = redis.call('ZCOUNT', K[3], '-inf', string.format('(%d', due))
  local tat = tonumber(redis.call('GET', K[1]) or now)
  if tat < now then tat = now end
  local line = tat + interval * (before + n) - tolerance - interval - now
  line = line - math.max(tonumber(A[8]), ahead)
  local own = tat + interval * n - tolerance - interval - now - ahead
  if line > 0 or own > 0 or paused > 0 then
    local retry = math.ceil(math.max(line, own, paused))
    if member ~= '' then
      redis.call('ZADD', K[3], string.format('%d', due), member)
      redis.call('ZADD', K[4], string.format('%d', now + retry + tonumber(A[7])), member)
      redis.call('PEXPIRE', K[3], 60000)
      redis.call('PEXPIRE', K[4], 60000)
    end
    return {0, retry}
  end
  local new_tat = tat + interval * n
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
  redis.call('SET', K[1], string.format('%d', new_tat), 'PX', ttl_ms)
  if member ~= '' then
    redis.call('ZREM', K[3], member)
    redis.call('ZREM', K[4], member)
  end
  local wait = new_tat - tolerance - interval - now
  if wait < 0 then wait = 0 end
  return {1, math.ceil(wait)}
end
"""
_RESERVE = RESERVE_LUA + "return reserve(KEYS, ARGV)\n"

# K: as reserve's.  ``unreserve(K, interval, n)`` gives back ``n`` tokens a caller booked
# and did not use (``interval``: the emission interval, us). ``pause(K, ms)`` stops every
# caller for ``ms`` (1), unless a pause began less than PAUSE_SPACING times its length ago
# (0).
ADJUST_LUA: Final = f"""
local SPACING = {PAUSE_SPACING}
local function unreserve(K, interval, n)
  local ttl = redis.call('PTTL', K[1])
  local tat = tonumber(redis.call('GET', K[1]))
  if tat and ttl > 0 then
    redis.call('SET', K[1], string.format('%d', tat - interval * n), 'PX', ttl)
  end
end
local function pause(K, ms)
  if ms <= 0 then return 0 end
  local t = redis.call('TIME')
  local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ms
  if redis.call('SET', K[2], string.format('%d', ends), 'PX', SPACING * ms, 'NX') then
    return 1
  end
  return 0
end
"""
# How long a turned-away caller may be late to ask again before its place is given up
# (a task's retry waits behind others in its worker; a dead one never asks again).
WAITER_GRACE: Final = 2.0
# How far ahead acquire() books tokens.
RESERVE_AHEAD: Final = 1.0
# How far ahead tokens are kept for the callers waiting in line (or the caller's own wait,
# when longer).
LINE_WINDOW: Final = 1.0


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
        self._reserve = client.register_script(_RESERVE)
        self._pause = client.register_script(ADJUST_LUA + "return pause(KEYS, tonumber(ARGV[1]))")
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
        """The keys :data:`RESERVE_LUA`'s ``reserve(K, A)`` takes, in order."""
        return self._keys

    def script_args(
        self, n: int, *, ahead: float, waiter: str = "", due_at: float | None = None
    ) -> list[Any]:
        """The arguments :data:`RESERVE_LUA`'s ``reserve(K, A)`` takes, in order."""
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
            keys=list(self._keys),
            args=self.script_args(n, ahead=ahead, waiter=waiter, due_at=due_at),
        )
        return bool(booked), int(wait_us) / 1_000_000

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
        if self._pause(keys=list(self._keys[:2]), args=[ms]):
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
