"""The rate limit's floor for the fault runs: what lateness a perfect line would give.

``python -m bench.chaos`` sends 600 messages at once (final 3-50 s after they are sent, 4 %
never) at the default 50 checks a second, and kills workers and Redis on a fixed plan.
The line is full for the first 35 s, so every second nothing polls lands on the checks
waiting. This simulation, with no workers, no Redis and no HTTP, serves the same workload
at exactly the rate limit, oldest due first, on the default schedule (5 s, then x1.5 to a
10 s cap, with its jitter), and stops polling during the outages the fault plan causes:
what the real runs' p99 is measured against in bench/RESULTS.md.

``python -m bench.line_sim`` prints p99 and max lateness for seeds 1-10 (each seed's
messages are that seed's in bench.chaos), with the crash run's outages and with none.
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

from smsbat_tracker.rules.schedule import Schedule

__all__ = ["CRASH_OUTAGES", "Lateness", "drawn", "main", "simulate"]

# When nothing polls in bench.chaos's crash run, as measured (no status request and no
# task started, crash seed 5 on 2cc7f6e): both workers killed at 24, 51 and 78 s and
# polling again 3.25-3.45 s later (restarted after 2 s, up in about 1.3 s); Redis killed
# at 37.5 and 64.5 s and polling again 3.6-3.65 s later (restarted after 3 s).
CRASH_OUTAGES: tuple[tuple[float, float], ...] = (
    (24.0, 27.3),
    (37.5, 41.15),
    (51.0, 54.25),
    (64.5, 68.1),
    (78.0, 81.45),
)


@dataclass(frozen=True, slots=True)
class Lateness:
    """Seconds from each final status to the check that saw it, over the final messages."""

    p50: float
    p99: float
    max: float
    checks: int


def drawn(seed: int, messages: int = 600, never_final: float = 0.04) -> list[float | None]:
    """Each message's seconds to final (None: never), drawn as ``python -m bench.chaos --seed
    <seed>`` draws its messages' (``_timeline``: never final?, delivered?, when), so that a
    seed here is that run's messages."""
    rng = random.Random(seed)
    out: list[float | None] = []
    for _ in range(messages):
        if rng.random() < never_final:
            out.append(None)
            continue
        rng.random()  # delivered or undeliverable: the same wait either way
        out.append(rng.uniform(3.0, 50.0))
    return out


def simulate(
    seed: int,
    *,
    messages: int = 600,
    rate: float = 50.0,
    deadline: float = 90.0,
    never_final: float = 0.04,
    outages: Sequence[tuple[float, float]] = (),
    schedule: Schedule | None = None,
    finals: Sequence[float | None] | None = None,
) -> Lateness:
    """One run: every message sent at 0, checked on ``schedule`` (the default one) through a
    line served at exactly ``rate`` checks a second, the earliest due first, except during
    ``outages`` ((start, end) seconds). ``finals``: each message's time to final (None:
    never), instead of ``messages`` drawn as bench.chaos draws them."""
    schedule = schedule or Schedule()
    final = list(finals) if finals is not None else drawn(seed, messages, never_final)
    messages = len(final)
    rng = random.Random(-seed)  # the schedule's jitter, apart from the messages' draws
    # (due, message, checks made): checks not due yet, then the line of those that are.
    # The first check comes first_delay after the send; after check n, delay(n) later.
    pending = [(schedule.first_delay, i, 0) for i in range(messages)]
    heapq.heapify(pending)
    line: list[tuple[float, int, int]] = []
    lateness: list[float] = []
    now, step, checks = 0.0, 1.0 / rate, 0
    while pending or line:
        while pending and pending[0][0] <= now:
            heapq.heappush(line, heapq.heappop(pending))
        if not line:
            now = max(now + step, pending[0][0])
            continue
        stopped = [end for start, end in outages if start <= now < end]
        if stopped:  # nothing polls until the outage ends
            now = max(stopped)
            continue
        _, i, made = heapq.heappop(line)
        checks += 1
        at = final[i]
        if at is not None and at <= now:
            lateness.append(now - at)
        elif now < deadline:
            heapq.heappush(pending, (now + schedule.delay(made + 1, rng.random), i, made + 1))
        now += step
    lateness.sort()

    def q(p: float) -> float:
        return round(lateness[int(p * (len(lateness) - 1))], 2)

    return Lateness(p50=q(0.5), p99=q(0.99), max=round(lateness[-1], 2), checks=checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.line_sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=50.0, help="checks a second")
    args = parser.parse_args(argv)
    print("seed  no fault p99 / max   crash run's outages p99 / max")
    for seed in range(1, args.seeds + 1):
        calm = simulate(seed, rate=args.rate)
        crashed = simulate(seed, rate=args.rate, outages=CRASH_OUTAGES)
        row = f"{seed:4d}  {calm.p99:8.2f} / {calm.max:5.2f}"
        print(f"{row}   {crashed.p99:8.2f} / {crashed.max:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
