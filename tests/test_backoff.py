"""Unit tests of smsbat_tracker.rules.schedule: compute_backoff and Schedule.next_wait."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from smsbat_tracker.config import load_settings
from smsbat_tracker.rules.decide import (
    Rules,
    campaign_first_check_at,
    campaign_first_tick_at,
    first_check_at,
)
from smsbat_tracker.rules.schedule import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_FIRST_DELAY,
    DEFAULT_MAX_DELAY,
    Rng,
    Schedule,
    compute_backoff,
    retry_backoff,
)


def fixed(value: float) -> Rng:
    """An rng that always returns ``value``."""
    return lambda: value


# ------------------------------------------------------------------ compute_backoff


def test_grows_exponentially_without_jitter() -> None:
    """first_delay * factor ** attempt while under the cap."""
    delays = [
        compute_backoff(n, first_delay=1.0, factor=2.0, max_delay=100.0, jitter=0.0)
        for n in range(7)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def test_defaults_follow_the_provider_advice() -> None:
    """Defaults start within 5-10 s, grow by DEFAULT_BACKOFF_FACTOR, and end at the cap."""
    delays = [compute_backoff(n, jitter=0.0) for n in range(40)]
    expected = [
        min(DEFAULT_MAX_DELAY, DEFAULT_FIRST_DELAY * DEFAULT_BACKOFF_FACTOR**n) for n in range(40)
    ]
    assert delays == pytest.approx(expected)
    assert 5.0 <= delays[0] <= 10.0
    assert delays == sorted(delays)
    assert delays[-1] == DEFAULT_MAX_DELAY


def test_is_capped_at_max_delay() -> None:
    """Once first_delay * factor ** attempt passes max_delay, max_delay is returned."""
    assert compute_backoff(10, first_delay=1.0, factor=2.0, max_delay=30.0, jitter=0.0) == 30.0


def test_factor_one_is_constant() -> None:
    """A factor of 1 means a constant delay."""
    assert {compute_backoff(n, first_delay=3.0, factor=1.0, jitter=0.0) for n in range(50)} == {3.0}


@pytest.mark.parametrize(
    ("rng_value", "expected"),
    [(0.0, 9.0), (0.5, 10.0), (1.0, 11.0)],
)
def test_jitter_bounds_with_fixed_rng(rng_value: float, expected: float) -> None:
    """rng 0 gives base * (1 - jitter), 0.5 the base, 1 base * (1 + jitter)."""
    delay = compute_backoff(
        0, first_delay=10.0, factor=2.0, max_delay=100.0, jitter=0.1, rng=fixed(rng_value)
    )
    assert delay == pytest.approx(expected)


def test_jitter_never_exceeds_max_delay() -> None:
    """At the cap, positive jitter is clipped while negative jitter still spreads."""
    high = compute_backoff(20, max_delay=20.0, jitter=0.5, rng=fixed(1.0))
    low = compute_backoff(20, max_delay=20.0, jitter=0.5, rng=fixed(0.0))
    assert high == 20.0
    assert low == pytest.approx(10.0)


def test_negative_attempt_is_an_error() -> None:
    """attempt < 0 raises ValueError."""
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        compute_backoff(-1)


@pytest.mark.parametrize("attempt", [64, 65, 1_000, 10**6, 10**18])
def test_huge_attempt_does_not_overflow(attempt: int) -> None:
    """Huge attempt numbers return max_delay instead of raising OverflowError."""
    delay = compute_backoff(attempt, factor=10.0, max_delay=60.0, jitter=0.0)
    assert delay == 60.0
    assert math.isfinite(delay)


# ---------------------------------------------------------------- Schedule.next_wait

# The jitter's midpoint: no spread, so waits read exactly.
MID = lambda: 0.5  # noqa: E731

PLAIN = Schedule(first_delay=5.0, factor=2.0, max_delay=20.0, jitter=0.0, min_interval=1.0)


@pytest.mark.parametrize("now", [100.0, 100.5, 1e9])
def test_next_wait_is_none_at_or_after_deadline(now: float) -> None:
    """No wait is given once the deadline has come."""
    assert PLAIN.next_wait(now=now, deadline_at=100.0, attempt=0, rng=MID) is None


def test_next_wait_is_the_backoff_when_far_from_deadline() -> None:
    """Far from the deadline, the wait is the backoff of the attempt."""
    assert PLAIN.next_wait(now=0.0, deadline_at=1000.0, attempt=1, rng=MID) == 10.0


def test_last_wait_lands_exactly_on_deadline() -> None:
    """A backoff past the deadline is cut so that now + wait == deadline_at."""
    now, deadline_at = 1_700_000_000.25, 1_700_000_003.0
    wait = PLAIN.next_wait(now=now, deadline_at=deadline_at, attempt=3, rng=MID)
    assert wait is not None
    assert now + wait == pytest.approx(deadline_at, abs=1e-6)


def test_retry_after_stretches_but_never_shortens() -> None:
    """A Retry-After longer than the backoff wins; a shorter one leaves the backoff."""
    assert PLAIN.next_wait(now=0.0, deadline_at=100.0, attempt=0, retry_after=12.0, rng=MID) == 12.0
    assert PLAIN.next_wait(now=0.0, deadline_at=100.0, attempt=0, retry_after=2.0, rng=MID) == 5.0
    # ... and is cut at the deadline too.
    assert PLAIN.next_wait(now=0.0, deadline_at=8.0, attempt=0, retry_after=30.0, rng=MID) == 8.0


def test_min_interval_floor_since_last_check() -> None:
    """The wait reaches at least min_interval after the last check, no more than needed."""
    quick = Schedule(first_delay=0.2, factor=1.0, max_delay=1.0, jitter=0.0, min_interval=1.0)
    wait = quick.next_wait(now=10.0, deadline_at=100.0, attempt=0, last_check_at=9.7, rng=MID)
    assert wait == pytest.approx(0.7)
    long_ago = quick.next_wait(now=10.0, deadline_at=100.0, attempt=0, last_check_at=2.0, rng=MID)
    assert long_ago == pytest.approx(0.2)


def test_defaults_respect_the_provider_minimum_interval() -> None:
    """Without a min_interval of its own, even a schedule of 0.1 s waits a second after a
    check: the provider's one-second minimum interval per message."""
    eager = Schedule(first_delay=0.1, factor=1.0, max_delay=0.1, jitter=0.0)
    wait = eager.next_wait(now=10.0, deadline_at=100.0, attempt=3, last_check_at=10.0, rng=MID)
    assert wait == pytest.approx(1.0)


def test_from_settings() -> None:
    """Schedule.from_settings copies the five schedule settings."""
    settings = load_settings(
        api_key="k",
        first_delay=2.0,
        backoff_factor=3.0,
        max_delay=30.0,
        jitter=0.2,
        min_interval=2.5,
    )
    assert Schedule.from_settings(settings) == Schedule(
        first_delay=2.0, factor=3.0, max_delay=30.0, jitter=0.2, min_interval=2.5
    )


# ------------------------------------------------------------------------ property

_seconds = st.floats(min_value=0.0, max_value=3_600.0, allow_nan=False)


@hypothesis_settings(max_examples=300, deadline=None, database=None)
@given(
    first_delay=_seconds,
    max_delay=st.floats(min_value=0.001, max_value=3_600.0),
    factor=st.floats(min_value=1.0, max_value=10.0),
    jitter=st.floats(min_value=0.0, max_value=0.999),
    min_interval=st.floats(min_value=1.0, max_value=3_600.0),
    attempt=st.integers(min_value=0, max_value=10**9),
    now=st.floats(min_value=0.0, max_value=2e9),
    remaining=st.floats(min_value=-100.0, max_value=86_400.0),
    since_last=st.one_of(st.none(), _seconds),
    retry_after=st.one_of(st.none(), _seconds),
    rng_value=st.floats(min_value=0.0, max_value=1.0),
)
def test_next_wait_is_bounded(
    first_delay: float,
    max_delay: float,
    factor: float,
    jitter: float,
    min_interval: float,
    attempt: int,
    now: float,
    remaining: float,
    since_last: float | None,
    retry_after: float | None,
    rng_value: float,
) -> None:
    """0 <= wait <= min(max(max_delay, retry_after or 0, min_interval), remaining), or None."""
    schedule = Schedule(
        first_delay=min(first_delay, max_delay),
        factor=factor,
        max_delay=max_delay,
        jitter=jitter,
        min_interval=min_interval,
    )
    deadline_at = now + remaining
    last_check_at = None if since_last is None else now - since_last
    wait = schedule.next_wait(
        now=now,
        deadline_at=deadline_at,
        attempt=attempt,
        last_check_at=last_check_at,
        retry_after=retry_after,
        rng=fixed(rng_value),
    )
    left = deadline_at - now
    if left <= 0:
        assert wait is None
        return
    assert wait is not None
    bound = min(max(max_delay, retry_after or 0.0, min_interval), left)
    assert 0.0 <= wait <= bound + 1e-9
    # The floors hold wherever the deadline leaves room for them.
    if retry_after is not None:
        assert wait >= min(retry_after, left) - 1e-9
    if last_check_at is not None:
        assert wait >= min(min_interval - (now - last_check_at), left) - 1e-9


def test_a_failed_request_is_retried_each_second_then_backed_off() -> None:
    """Every second (the provider's per-message minimum) for the first 16 failures in a
    row; an API that keeps failing is then backed off, doubling to 10 s."""
    waits = [retry_backoff(n) for n in range(1, 22)]
    assert waits == [1.0] * 16 + [2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_retry_after_is_never_cut_short() -> None:
    """A 429's Retry-After stretches the retry; a shorter one changes nothing."""
    assert retry_backoff(1, retry_after=30.0) == 30.0
    assert retry_backoff(18, retry_after=1.0) == 4.0
    assert retry_backoff(10**9) == 10.0  # no overflow


def test_retry_backoff_needs_a_failure() -> None:
    """It counts failures from 1: zero is a caller's mistake."""
    with pytest.raises(ValueError, match="failures"):
        retry_backoff(0)


def test_next_wait_draws_its_jitter_from_the_rng_passed_in() -> None:
    """A seeded ``random.Random`` makes next_wait exact (compute_backoff's value for the
    same draw), and the global ``random`` is not drawn from."""
    jittery = Schedule(first_delay=5.0, factor=2.0, max_delay=20.0, jitter=0.1)
    before = random.getstate()
    wait = jittery.next_wait(now=0.0, deadline_at=100.0, attempt=1, rng=random.Random(42).random)
    assert random.getstate() == before
    assert wait == compute_backoff(
        1, first_delay=5.0, factor=2.0, max_delay=20.0, jitter=0.1, rng=random.Random(42).random
    )
    assert wait == pytest.approx(10.0 + 1.0 * (2 * 0.6394267984578837 - 1))


# ------------------------------------------------------------------------ first checks

T0 = 1_700_000_000.25
# The defaults: the first check 5 s after the enqueue, spread by ±10 % in a campaign.
DEFAULTS = Rules.from_settings(load_settings(api_key="k"), Schedule())


def test_a_tracked_messages_first_check_comes_first_delay_after_the_enqueue() -> None:
    """TrackTask.apply_async's first check: ``min(now + first_delay, deadline_at)`` (the
    due score), a countdown of ``min(first_delay, deadline_at - now)``, at once when the
    final status is known; no jitter."""
    assert DEFAULTS.schedule.first_delay == 5.0
    for deadline_at in (T0 + 3600.0, T0 + 5.0, T0 + 3.0, T0 + 0.5):
        at = first_check_at(DEFAULTS, now=T0, deadline_at=deadline_at)
        assert at == min(T0 + 5.0, deadline_at)
        assert at - T0 == pytest.approx(min(5.0, deadline_at - T0), abs=1e-6)
        assert first_check_at(DEFAULTS, now=T0, deadline_at=deadline_at, final=True) == T0


def test_a_campaigns_first_checks_are_spread_as_before() -> None:
    """register()'s first checks: ``min(start + first * (1 + jitter * (2 r - 1)), deadline)``
    with r drawn from the rng passed in, so 4.5-5.5 s after the start with the defaults;
    exact for a seeded ``random.Random`` (seed 7 draws 0.3238...: 4.8238 s)."""
    first, jitter = 5.0, 0.1
    ours, today = random.Random(7), random.Random(7)
    deadline_at = T0 + 3600.0
    before = random.getstate()
    spread = [
        campaign_first_check_at(DEFAULTS, started_at=T0, deadline_at=deadline_at, rng=ours.random)
        for _ in range(1000)
    ]
    assert random.getstate() == before
    assert spread == [
        min(T0 + first * (1 + jitter * (2 * today.random() - 1)), deadline_at) for _ in range(1000)
    ]
    assert spread[0] == pytest.approx(T0 + 5.0 * (1 + 0.1 * (2 * 0.32383276483316237 - 1)))
    assert all(T0 + 4.5 <= at <= T0 + 5.5 for at in spread)
    assert max(spread) - min(spread) > 0.9  # spread over the whole range, not one burst


def test_a_campaigns_first_check_never_passes_its_deadline() -> None:
    """A deadline sooner than the first delay is the first check, whatever the draw."""
    for draw in (0.0, 0.5, 0.999):
        at = campaign_first_check_at(
            DEFAULTS,
            started_at=T0,
            deadline_at=T0 + 2.0,
            rng=fixed(draw),
        )
        assert at == T0 + 2.0


def test_a_campaigns_first_tick_is_its_earliest_first_check() -> None:
    """register()'s due score and track_campaign's countdown for the first tick:
    ``start + first_delay * (1 - jitter)`` (4.5 s with the defaults), exactly the first
    check of the lowest draw."""
    tick = campaign_first_tick_at(DEFAULTS, started_at=T0)
    assert tick == T0 + 5.0 * (1 - 0.1)
    lowest = campaign_first_check_at(
        DEFAULTS,
        started_at=T0,
        deadline_at=T0 + 3600.0,
        rng=fixed(0.0),
    )
    assert tick == lowest
