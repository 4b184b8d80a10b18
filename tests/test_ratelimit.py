"""Tests of smsbat_tracker.store.ratelimit.RateLimiter against a real Redis server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import redis
from structlog.testing import capture_logs

from smsbat_tracker.config import Settings
from smsbat_tracker.errors import RateLimited, ServerError
from smsbat_tracker.store import ratelimit
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import (
    DEFAULT_PAUSE,
    LINE_WINDOW,
    PAUSE_MAX,
    WAITER_GRACE,
    RateLimiter,
)
from tests.conftest import wait_for


@pytest.fixture
def limiter_for(redis_client: redis.Redis, settings: Settings) -> Callable[..., RateLimiter]:
    """Build a RateLimiter on the emptied test Redis."""

    def make(rate: float, burst: float | None = None) -> RateLimiter:
        return RateLimiter(redis_client, settings, rate=rate, burst=burst)

    return make


def test_rate_from_settings(
    redis_client: redis.Redis, make_settings: Callable[..., Settings]
) -> None:
    """Without an explicit rate, SMSBAT_RATE_LIMIT is used."""
    limiter = RateLimiter(redis_client, make_settings(rate_limit=7.0))
    assert limiter.rate == 7.0
    assert limiter.enabled


def test_rate_zero_is_disabled(
    limiter_for: Callable[..., RateLimiter], redis_client: redis.Redis
) -> None:
    """rate=0 grants everything at once and never touches Redis."""
    limiter = limiter_for(0)
    assert not limiter.enabled
    assert [limiter.try_acquire() for _ in range(1_000)] == [0.0] * 1_000
    limiter.acquire(10_000)
    asyncio.run(limiter.acquire_async(10_000))
    assert redis_client.keys("*") == []


def test_grants_then_asks_to_wait(limiter_for: Callable[..., RateLimiter]) -> None:
    """At 0.5/s without burst, the first call is granted and the second waits about 2 s."""
    limiter = limiter_for(0.5, burst=1)
    assert limiter.try_acquire() == 0.0
    wait = limiter.try_acquire()
    assert 1.5 < wait <= 2.0
    # A refused call takes no token: asking again gives the same (or a shorter) wait.
    assert 0.0 < limiter.try_acquire() <= wait


def test_burst_is_granted_at_once(limiter_for: Callable[..., RateLimiter]) -> None:
    """A burst of 5 is granted back to back; the sixth call waits."""
    limiter = limiter_for(1, burst=5)
    assert [limiter.try_acquire() for _ in range(5)] == [0.0] * 5
    assert limiter.try_acquire() > 0.0


def test_try_acquire_needs_a_positive_count(limiter_for: Callable[..., RateLimiter]) -> None:
    """try_acquire(0) is a programming error."""
    with pytest.raises(ValueError, match="n must be >= 1"):
        limiter_for(10).try_acquire(0)


def test_acquire_needs_a_positive_count(limiter_for: Callable[..., RateLimiter]) -> None:
    """acquire() with a negative count raises like try_acquire, taking no tokens."""
    with pytest.raises(ValueError, match="n must be"):
        limiter_for(200).acquire(-1)


def test_pause_blocks_for_about_the_pause(limiter_for: Callable[..., RateLimiter]) -> None:
    """After pause(10), try_acquire asks every caller to wait about 10 s, and logs it once."""
    limiter = limiter_for(1000)
    with capture_logs() as events:
        limiter.pause(10.0)
        limiter.pause(1.0)  # never shortens a running pause
    assert 9.0 < limiter.try_acquire() <= 10.0
    assert events == [{"event": "ratelimit.pause", "log_level": "warning", "seconds": 10.0}]


def test_pause_is_shared_across_limiters(redis_client: redis.Redis, settings: Settings) -> None:
    """A pause set through one limiter (one worker) stops another on the same Redis."""
    first = RateLimiter(redis_client, settings, rate=100)
    second = RateLimiter(redis_client, settings, rate=100)
    first.pause(2.0)
    assert 1.5 < second.try_acquire() <= 2.0


def test_observe_rate_limited_pauses_briefly(
    limiter_for: Callable[..., RateLimiter], redis_client: redis.Redis
) -> None:
    """observe_error(RateLimited(0.5)) pauses everyone 0.5 s; a longer Retry-After pauses
    everyone PAUSE_MAX at most (the message itself waits the whole Retry-After)."""
    limiter = limiter_for(1000)
    limiter.observe_error(RateLimited(0.5))
    assert 0.3 < limiter.try_acquire() <= 0.5
    redis_client.delete(Keys().rate_pause())
    limiter.observe_error(RateLimited(30.0))
    assert PAUSE_MAX * 0.5 < limiter.try_acquire() <= PAUSE_MAX


def test_a_stream_of_429s_pauses_at_most_a_quarter_of_the_time(
    limiter_for: Callable[..., RateLimiter],
) -> None:
    """A second 429 within PAUSE_SPACING times a pause's length does not pause again: a
    provider answering 429 to one request in ten cannot stop every tracker for good."""
    limiter = limiter_for(1000)
    limiter.pause(0.2)
    wait_for(lambda: limiter.try_acquire() == 0.0, timeout=2)
    limiter.pause(0.2)  # 0.2-0.8 s after the first: no new pause
    assert limiter.try_acquire() == 0.0


def test_observe_rate_limited_without_retry_after_uses_default(
    limiter_for: Callable[..., RateLimiter],
) -> None:
    """A 429 without Retry-After pauses for DEFAULT_PAUSE."""
    limiter = limiter_for(1000)
    limiter.observe_error(RateLimited(None))
    assert DEFAULT_PAUSE * 0.5 < limiter.try_acquire() <= DEFAULT_PAUSE


def test_other_errors_do_not_pause(limiter_for: Callable[..., RateLimiter]) -> None:
    """Errors other than RateLimited leave the limiter alone."""
    limiter = limiter_for(1000)
    limiter.observe_error(ServerError(500))
    limiter.observe_error(ValueError("x"))
    assert limiter.try_acquire() == 0.0


def test_acquire_more_than_the_burst_is_sliced(limiter_for: Callable[..., RateLimiter]) -> None:
    """acquire(n) beyond the burst completes, spread at the rate (105 at 1000/s, burst 5)."""
    limiter = limiter_for(1000, burst=5)
    started = time.monotonic()
    limiter.acquire(105)
    elapsed = time.monotonic() - started
    # GCRA cannot grant 100 tokens beyond the burst in less than 100 ms at 1000/s.
    assert 0.095 <= elapsed < 5.0


def test_acquire_async(limiter_for: Callable[..., RateLimiter]) -> None:
    """acquire_async waits for tokens like acquire (here 2 at 20/s without burst)."""
    limiter = limiter_for(20, burst=1)
    started = time.monotonic()
    asyncio.run(limiter.acquire_async(2))
    assert 0.03 <= time.monotonic() - started < 1.0


def test_threads_together_stay_within_the_rate(
    limiter_for: Callable[..., RateLimiter],
) -> None:
    """4 threads acquiring for 0.5 s at 200/s get no more than 5% over 100 plus the burst."""
    rate, window, threads = 200, 0.5, 4
    limiter = limiter_for(rate)
    burst = rate / 20  # the default burst
    start = threading.Barrier(threads + 1)
    grants: list[int] = [0] * threads
    began = 0.0

    def work(index: int) -> None:
        start.wait()
        while True:
            limiter.acquire()
            if time.monotonic() - began >= window:
                return
            grants[index] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    began = time.monotonic()
    start.wait()
    for worker in workers:
        worker.join(timeout=10)
    total = sum(grants)
    assert total <= rate * window * 1.05 + burst
    assert total >= rate * window * 0.6
    assert min(grants) > 0  # every thread got its share, none starved


def test_older_requests_are_served_first(limiter_for: Callable[..., RateLimiter]) -> None:
    """Past the limit, the request that fell due first gets the next token, whoever asks first.

    At 1/s the bucket is booked a second ahead. "new" and then "old" (due 5 s earlier) are
    turned away; with room for one more token, "new" is still refused because "old" is
    in line before it, and "old" is served; then "new" is.
    """
    limiter = limiter_for(1, burst=1)
    now = time.time()
    assert limiter.reserve(1, ahead=0.0) == (True, 0.0)
    assert not limiter.reserve(1, ahead=0.5, waiter="new", due_at=now)[0]
    assert not limiter.reserve(1, ahead=0.5, waiter="old", due_at=now - 5)[0]
    booked, wait = limiter.reserve(1, ahead=1.5, waiter="new", due_at=now)
    assert not booked
    assert 0.3 < wait <= 0.5  # its turn comes after "old"'s token, a second later
    assert limiter.reserve(1, ahead=1.5, waiter="old", due_at=now - 5)[0]
    assert limiter.reserve(1, ahead=2.5, waiter="new", due_at=now)[0]


def test_a_waiter_keeps_its_first_place(limiter_for: Callable[..., RateLimiter]) -> None:
    """A waiter asking again with a later due time (its retry's) keeps its first place."""
    limiter = limiter_for(1, burst=1)
    now = time.time()
    assert limiter.reserve(1, ahead=0.0)[0]
    assert not limiter.reserve(1, ahead=0.5, waiter="a", due_at=now - 5)[0]
    assert not limiter.reserve(1, ahead=0.5, waiter="b", due_at=now - 3)[0]
    assert not limiter.reserve(1, ahead=1.5, waiter="b", due_at=now - 3)[0]
    assert limiter.reserve(1, ahead=1.5, waiter="a", due_at=now + 1)[0]


def test_a_waiter_that_never_comes_back_is_forgotten(
    limiter_for: Callable[..., RateLimiter], redis_client: redis.Redis, settings: Settings
) -> None:
    """A turned-away caller that does not ask again within WAITER_GRACE of its turn loses
    its place, so that a dead task never blocks the line."""
    limiter = limiter_for(1, burst=1)
    waiters = Keys(settings.key_prefix).rate_waiters()
    assert limiter.reserve(1, ahead=0.0)[0]
    assert not limiter.reserve(1, ahead=0.9, waiter="ghost", due_at=time.time() - 60)[0]
    assert redis_client.zscore(waiters, "ghost") is not None

    def swept() -> bool:
        limiter.try_acquire()  # anyone's request sweeps the line; a one-off leaves no entry
        return redis_client.zcard(waiters) == 0

    wait_for(swept, timeout=WAITER_GRACE + 3, interval=0.2)


def test_waiters_not_back_give_up_their_room_once_tokens_go_unused(
    limiter_for: Callable[..., RateLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiters due back by now that have not asked again (their worker died) stop holding
    room in the line once tokens have gone unused for half its window: the line does not
    stand still, every caller turned away with the bucket idle, until they are forgotten
    (here never: a grace of 30 s). While the bucket is busy, their room is kept."""
    monkeypatch.setattr(ratelimit, "WAITER_GRACE", 30.0)
    limiter = limiter_for(2, burst=1)  # a token every 0.5 s: the 1 s window holds two
    old = time.time() - 60
    assert limiter.reserve(1, ahead=0.0)[0]
    for i in range(4):
        assert not limiter.reserve(1, ahead=0.0, waiter=f"ghost{i}", due_at=old)[0]
    now = time.time()
    assert not limiter.reserve(1, ahead=0.5, waiter="new", due_at=now)[0]
    wait_for(
        lambda: limiter.reserve(1, ahead=0.5, waiter="new", due_at=now)[0],
        timeout=10,
        interval=0.1,
    )


def test_late_waiters_hold_up_the_line_only_beyond_its_window(
    limiter_for: Callable[..., RateLimiter],
) -> None:
    """Tokens are kept for the waiters in line only a LINE_WINDOW ahead: five older waiters
    that have not come back yet (10 tokens/s, a 1 s window) leave room for a new request,
    twenty do not."""
    limiter = limiter_for(10, burst=1)
    old = time.time() - 60
    assert limiter.reserve(1, ahead=0.0)[0]
    for i in range(5):
        assert not limiter.reserve(1, ahead=0.0, waiter=f"w{i}", due_at=old)[0]
    assert limiter.reserve(1, ahead=0.2, waiter="new")[0]
    for i in range(5, 20):
        assert not limiter.reserve(1, ahead=0.0, waiter=f"w{i}", due_at=old)[0]
    booked, wait = limiter.reserve(1, ahead=0.2, waiter="late")
    assert not booked
    assert 0.8 < wait <= LINE_WINDOW + 0.2


def test_when_a_pause_ends_the_line_goes_in_order(
    limiter_for: Callable[..., RateLimiter], redis_client: redis.Redis
) -> None:
    """Callers turned away by a pause take their place in the line: when it ends, those
    standing first (checks at their deadlines) are served first, whoever asks first."""
    limiter = limiter_for(1)  # one token a second: three in line are more than the window
    limiter.pause(30.0)
    now = time.time()
    first = [f"m:deadline{i}" for i in range(3)]
    for name in [*first, "m:late"]:
        due = now - 3600 if name in first else now
        assert limiter.reserve(1, ahead=0.1, waiter=name, due_at=due)[0] is False
    redis_client.delete(Keys().rate_pause())  # the pause ends
    assert limiter.reserve(1, ahead=0.1, waiter="m:late", due_at=now)[0] is False
    assert limiter.reserve(1, ahead=0.1, waiter=first[0], due_at=now - 3600)[0] is True
