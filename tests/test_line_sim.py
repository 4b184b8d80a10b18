"""bench.line_sim: the perfect line behind bench/RESULTS.md's floor for the fault runs."""

from __future__ import annotations

from bench.line_sim import CRASH_OUTAGES, drawn, simulate

from smsbat_tracker.rules.schedule import Schedule

EXACT = Schedule(jitter=0.0)  # the default schedule, without its jitter


def test_a_check_is_served_at_its_due_time_when_the_line_is_free() -> None:
    """One message final at 4 s is seen by its first check, at 5 s: 1 s late."""
    run = simulate(1, finals=[4.0], schedule=EXACT)
    assert (run.p99, run.max, run.checks) == (1.0, 1.0, 1)


def test_an_outage_adds_its_seconds_to_the_checks_waiting() -> None:
    """Polling stopped from 4.5 to 9 s: the check due at 5 s is made at 9 s."""
    run = simulate(1, finals=[4.0], schedule=EXACT, outages=[(4.5, 9.0)])
    assert run.max == 5.0


def test_the_line_serves_at_the_rate_oldest_first() -> None:
    """Two checks due at once, one a second: the second waits a second."""
    run = simulate(1, finals=[1.0, 1.0], rate=1.0, schedule=EXACT)
    assert (run.p50, run.max, run.checks) == (4.0, 5.0, 2)


def test_a_message_not_final_is_checked_again_on_the_schedule() -> None:
    """Final at 6 s: missed at 5 s, seen at 12.5 s (5 s, then x1.5)."""
    run = simulate(1, finals=[6.0], schedule=EXACT)
    assert (run.max, run.checks) == (6.5, 2)


def test_the_crash_runs_outages_cost_the_default_workload() -> None:
    """The fault runs' workload on the default schedule: the outages raise the p99, and a
    seed gives the same figures every time."""
    calm = simulate(1)
    crashed = simulate(1, outages=CRASH_OUTAGES)
    assert crashed.p99 > calm.p99
    assert simulate(1, outages=CRASH_OUTAGES) == crashed


def test_a_seed_draws_the_chaos_runs_messages() -> None:
    """A seed here is the same seed's messages in bench.chaos (300 trackings, then the
    campaign's 300), so that each fault run is read against its own floor."""
    import random

    from bench.chaos import _timeline

    rng = random.Random(4)
    expected = [_timeline(rng)[2] for _ in range(600)]
    assert drawn(4) == expected
