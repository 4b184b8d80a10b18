"""What a tracking's parts cost, each timed alone: the least any tracker adds to Celery.

``python -m bench.cpu_parts`` starts a Redis-protocol server and the simulated API, and
times in this process's own thread (``time.thread_time``: the servers' work is not in it)
the parts a tracking adds to Celery's retries, ``--runs`` times each:

- ``redis_round_trip``: one bare Redis command (``GET``), a round trip's floor;
- ``status_request``: one status request through the tracker's API client;
- ``follow_up_publish``: publishing one callback with a tracking's result (the task
  message and its ``task-sent`` event, as the tracker's app sends them);
- ``check_in_flight`` and ``check_final``: a whole :func:`run_check` of a message still in
  flight (its two Redis scripts and its request) and of one already final (plus the
  settle and the callback's publish), the request made in the calling thread.

With ``bench/results/cpu_per_message.json`` (``python -m bench.cpu_floor --per-message``)
beside it, it also gives the least ratio to that run's floor that a tracker could reach at
that run's checks a message: Celery's no-op retries plus only a status request a check and
the follow-up's publish (the documented loop as a Celery task), and plus two Redis round
trips a check (the least state a tracking shared by many workers keeps). The figures go
to ``bench/results/cpu_parts.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cpu_floor import sandboxed_app
from smsbat_tracker.celery.task_base import as_signature_dict
from smsbat_tracker.engine.run import RunRequest, run_check
from smsbat_tracker.engine.session import Subscription, build_result
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.worker import app

RESULTS = Path(__file__).parent / "results"
QUEUE = "bench-parts"  # the follow-ups' queue: nobody consumes it
PACE = 1 / 40  # seconds between checks: under the default rate limit (50/s)


def _timed(op: Callable[[], Any], runs: int) -> float:
    """The median thread CPU seconds of ``op()`` over ``runs`` calls."""
    samples = []
    for _ in range(runs):
        started = time.thread_time()
        op()
        samples.append(time.thread_time() - started)
    return statistics.median(samples)


def measure(runs: int) -> dict[str, float]:
    """Each part's median thread CPU, in microseconds."""
    # Every setting at its default but the answer wait, long enough that a request runs
    # in the calling thread (where it is timed), not in the request thread.
    with sandboxed_app(1, answer_wait=300.0) as (_settings, sandbox):
        try:
            return _measure(runs, sandbox)
        finally:
            app.close_engine()


def _measure(runs: int, sandbox: SandboxServer) -> dict[str, float]:
    engine = app.engine
    api = engine.require_api()
    callback = record_outcome.s(label="parts").set(queue=QUEUE)
    in_flight = sandbox.state.create_scripted([("processing", 0)])
    status = api.get_status(in_flight)
    result = build_result(
        in_flight, "delivered", status=status, source="poll", started_at=time.time(), polls=3
    )
    figures = {
        "redis_round_trip": _timed(lambda: engine.redis.get("bench:parts"), runs),
        "status_request": _timed(lambda: api.get_status(in_flight), runs),
        "follow_up_publish": _timed(lambda: callback.apply_async((result,)), runs),
    }
    subscription = Subscription(
        on_delivered=as_signature_dict("on_delivered", callback), on_failed=None, on_timeout=None
    )
    figures["check_in_flight"] = _checks(sandbox, subscription, "processing", runs)
    figures["check_final"] = _checks(sandbox, subscription, "delivered", runs)
    return {k: round(v * 1_000_000, 1) for k, v in figures.items()}


def _checks(sandbox: SandboxServer, subscription: Subscription, status: str, runs: int) -> float:
    """The median thread CPU of the first run of ``runs`` trackings of messages in
    ``status``, each registered (untimed) just before."""
    engine = app.engine
    ids = [sandbox.state.create_scripted([(status, 0.0)]) for _ in range(runs)]
    cpu: list[float] = []
    for message_id in ids:
        now = time.time()
        owner = f"parts-{message_id}"
        engine.register(
            message_id, subscription, owner=owner, started_at=now,
            deadline_at=now + 60, first_at=now,
        )  # fmt: skip
        request = RunRequest(
            message_id, owner=owner, run=0, started_at=now,
            deadline_at=now + 60, due_at=now, now=now,
        )  # fmt: skip
        started = time.thread_time()
        run_check(engine, request)
        cpu.append(time.thread_time() - started)
        time.sleep(PACE)
    return statistics.median(cpu)


def bounds(parts: dict[str, float], per_message: dict[str, Any]) -> dict[str, float]:
    """The least ratios to ``per_message``'s floor (see the module's docstring)."""
    floor_us = per_message["floor_cpu_ms_per_message"] * 1000
    checks = per_message["checks_per_message"]
    doc_loop = parts["follow_up_publish"] + checks * parts["status_request"]
    shared = doc_loop + checks * 2 * parts["redis_round_trip"]
    return {
        "checks_per_message": checks,
        "floor_us_per_message": round(floor_us, 1),
        "least_ratio_request_and_follow_up": round(1 + doc_loop / floor_us, 3),
        "least_ratio_with_two_round_trips": round(1 + shared / floor_us, 3),
        "follow_up_alone": round(1 + parts["follow_up_publish"] / floor_us, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_parts", description=__doc__)
    parser.add_argument("--runs", type=int, default=400, help="calls of each part")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": args.runs,
        "us": measure(args.runs),
    }
    per_message = RESULTS / "cpu_per_message.json"
    if per_message.exists():
        figures["bounds"] = bounds(figures["us"], json.loads(per_message.read_text()))
    (RESULTS / "cpu_parts.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
