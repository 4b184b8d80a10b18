"""bench.schedule_sim: the schedule simulation behind bench/RESULTS.md's reading on adapting."""

from __future__ import annotations

import itertools
import math

from bench.schedule_sim import (
    adaptive_schedule,
    doc_loop_schedule,
    fixed_schedule,
    sample_final_times,
    score,
)

from smsbat_tracker.rules.schedule import MIN_INTERVAL


def test_fixed_schedule_is_track_messages_own() -> None:
    """5 s, then waits x1.5 to a 10 s cap, the last one cut to land on the deadline."""
    assert fixed_schedule(deadline=40.0) == [5.0, 12.5, 22.5, 32.5, 40.0]


def test_score_counts_checks_until_seen_and_the_delay() -> None:
    """A final at 6 s is seen by the check at 10 s: 3 checks, 4 s late; a never-final pays all."""
    s = score([0.0, 5.0, 10.0], [6.0, math.inf])
    assert s.calls_per_message == (3 + 3) / 2
    assert s.p95_delay_s == 4.0
    assert s.max_delay_s == 4.0


def test_doc_loop_checks_every_five_seconds_to_sixty() -> None:
    """The documentation's loop: at once, then every 5 s, the last at 60 s."""
    times = doc_loop_schedule()
    assert times[0] == 0.0
    assert times[-1] == 60.0
    assert len(times) == 13


def test_adaptive_schedule_keeps_its_target_and_the_rules() -> None:
    """The learned schedule meets its p95 target, ends at the deadline, keeps 1 s between checks."""
    learned = sample_final_times(2_000, seed=3)
    schedule = adaptive_schedule(learned, deadline=120.0, target_p95=8.0)
    assert score(schedule, learned).p95_delay_s <= 8.0
    assert schedule[-1] == 120.0
    assert min(b - a for a, b in itertools.pairwise(schedule)) >= MIN_INTERVAL
