"""A simulation of check schedules on the benchmark's delivery-time mix: is adapting worth it?

``track_message`` checks on a fixed schedule (first check at 5 s, waits growing x1.5 to a
10 s cap, one last check at the deadline). A schedule that adapts to the delivery times it
observes could place checks where messages actually turn final. Before building one, this
module measures what it would gain, with no workers, no Redis and no HTTP: messages get
their time-to-final from the sandbox's own distribution, and each schedule is scored by
calls per message and the p95 detection delay, as the benchmark scores the real modes.

The adaptive schedule is the cheapest one for a *learned* distribution: dynamic programming
over a 0.5 s grid picks the check times that minimise checks + w * total detection delay,
and w is the smallest that keeps the p95 delay within the target on the learning sample.
It is then scored on a fresh sample, as it would meet new messages.

``python -m bench.schedule_sim`` prints the table.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from bench.workload import MEDIAN_FINAL, NEVER_FINAL_RATE, P95_FINAL
from smsbat_tracker.rules.schedule import MIN_INTERVAL, Schedule

__all__ = [
    "Score",
    "adaptive_schedule",
    "doc_loop_schedule",
    "fixed_schedule",
    "main",
    "sample_final_times",
    "score",
]

_Z_95 = 1.6448536269514722
GRID_S = 0.5  # the adaptive schedule's time step
MIN_GAP_S = MIN_INTERVAL  # the provider's rule: never two checks of one message within 1 s


def sample_final_times(count: int, seed: int) -> list[float]:
    """Times to final (s) drawn as the sandbox draws them; ``inf`` for a never-final one."""
    rng = random.Random(seed)
    mu = math.log(MEDIAN_FINAL)
    sigma = math.log(P95_FINAL / MEDIAN_FINAL) / _Z_95
    return [
        math.inf if rng.random() < NEVER_FINAL_RATE else rng.lognormvariate(mu, sigma)
        for _ in range(count)
    ]


def fixed_schedule(schedule: Schedule | None = None, deadline: float = 120.0) -> list[float]:
    """Check times of ``track_message``'s own schedule (defaults, no jitter)."""
    schedule = schedule or Schedule(jitter=0.0)
    times = [min(schedule.first_delay, deadline)]
    while True:
        wait = schedule.next_wait(
            now=times[-1], deadline_at=deadline, attempt=len(times), rng=lambda: 0.5
        )
        if wait is None:
            return times
        times.append(times[-1] + wait)


def doc_loop_schedule(interval: float = 5.0, give_up: float = 60.0) -> list[float]:
    """The documentation's loop: at once, then every ``interval`` s, until ``give_up``."""
    return [i * interval for i in range(int(give_up / interval) + 1)]


@dataclass(frozen=True)
class Score:
    """How a schedule does on a sample."""

    calls_per_message: float
    p95_delay_s: float
    max_delay_s: float


def score(schedule: Sequence[float], finals: Sequence[float]) -> Score:
    """Checks until the final status is seen (or the schedule ends), and detection delays."""
    calls, delays = 0, []
    for final in finals:
        seen = bisect.bisect_left(schedule, final)  # the first check at or after the final
        if seen < len(schedule):
            calls += seen + 1
            delays.append(schedule[seen] - final)
        else:
            calls += len(schedule)
    delays.sort()
    p95 = delays[min(len(delays) - 1, math.ceil(0.95 * len(delays)) - 1)] if delays else 0.0
    return Score(
        calls_per_message=calls / len(finals),
        p95_delay_s=p95,
        max_delay_s=delays[-1] if delays else 0.0,
    )


def _cheapest(finals: Sequence[float], deadline: float, weight: float) -> list[float]:
    """The grid schedule minimising checks + ``weight`` * total delay (ends at the deadline)."""
    steps = round(deadline / GRID_S)
    gap = math.ceil(MIN_GAP_S / GRID_S)
    n = len(finals)
    known = sorted(f for f in finals if f <= deadline)
    # Prefix sums at each grid point: share of messages final by then, and their time sum.
    share, total = [0.0] * (steps + 1), [0.0] * (steps + 1)
    j, running = 0, 0.0
    for k in range(steps + 1):
        while j < len(known) and known[j] <= k * GRID_S:
            running += known[j]
            j += 1
        share[k], total[k] = j / n, running / n
    inf = math.inf
    best = [inf] * (steps + 1)
    back = [-1] * (steps + 1)
    for b in range(steps + 1):
        t = b * GRID_S
        # From the start (no check yet): every message pays for this first check.
        best[b], back[b] = 1.0 + weight * (t * share[b] - total[b]), -1
        for a in range(0, b - gap + 1):
            if best[a] == inf:
                continue
            pending = 1.0 - share[a]
            delay = t * (share[b] - share[a]) - (total[b] - total[a])
            cost = best[a] + pending + weight * delay
            if cost < best[b]:
                best[b], back[b] = cost, a
    times, k = [], steps
    while k != -1:
        times.append(k * GRID_S)
        k = back[k]
    return times[::-1]


def adaptive_schedule(
    learned: Sequence[float], deadline: float = 120.0, target_p95: float = 9.0
) -> list[float]:
    """The cheapest grid schedule whose p95 delay on ``learned`` is within ``target_p95``."""
    low, high = 1e-4, 10.0  # weight of one second of delay, in checks
    for _ in range(40):
        mid = math.sqrt(low * high)
        if score(_cheapest(learned, deadline, mid), learned).p95_delay_s <= target_p95:
            high = mid
        else:
            low = mid
    return _cheapest(learned, deadline, high)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the fixed, adaptive and documentation schedules' scores on a fresh sample."""
    parser = argparse.ArgumentParser(prog="python -m bench.schedule_sim", description=__doc__)
    parser.add_argument("--learn", type=int, default=2_000, help="messages learned from")
    parser.add_argument("--test", type=int, default=20_000, help="messages scored")
    parser.add_argument(
        "--target", type=float, nargs="+", default=[6.0, 8.0, 9.0, 10.0], help="p95 targets, s"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    learned = sample_final_times(args.learn, args.seed)
    fresh = sample_final_times(args.test, args.seed + 1)
    doc = score(doc_loop_schedule(), fresh)
    rows = [
        ("a  doc loop (every 5 s, 60 s)", doc_loop_schedule()),
        ("b  fixed (5 s, x1.5, 10 s cap)", fixed_schedule()),
        *(
            (f"b' adaptive, p95 target {target:g} s", adaptive_schedule(learned, 120.0, target))
            for target in args.target
        ),
    ]
    print(f"{'schedule':40} {'checks':>6} {'calls/msg':>9} {'vs a':>6} {'p95 s':>6} {'max s':>6}")
    for name, schedule in rows:
        s = score(schedule, fresh)
        ratio = s.calls_per_message / doc.calls_per_message
        print(
            f"{name:40} {len(schedule):>6} {s.calls_per_message:>9.2f} {ratio:>5.2f}x "
            f"{s.p95_delay_s:>6.2f} {s.max_delay_s:>6.2f}"
        )
    for name, schedule in rows[2:]:
        print(f"{name}: checks at", " ".join(f"{t:g}" for t in schedule), "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
