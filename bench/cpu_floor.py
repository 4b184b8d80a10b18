"""Worker CPU per ``track_message`` check, against Celery's own floor, in one run.

``python -m bench.cpu_floor`` starts one ``celery worker`` (prefork, 2 children) with the
default settings, but for a schedule of one check a second and the rate limit off, so that
the checks come fast enough to measure. It then runs, one after the other on that worker:

- *floor*: ``--chains`` chains of a no-op task that retries itself with a 1 s countdown,
  ``--checks`` times each: what Celery itself costs per retry (publish, ETA hold, ack);
- *checks*: ``--chains`` messages that stay "processing", tracked with ``track_message``
  until each has had ``--checks`` status checks (one a second).

It reads the worker's CPU (main process and children, from ``/proc``) before and after each
phase, and prints the CPU per retry, per check, and their ratio. The figures go to
``bench/results/cpu_floor.json``.

``--per-message`` measures what a user pays instead, at the default schedule (every
setting at its default, deadline 60 s): ``--messages`` messages that turn final 8-25 s
after the send are tracked with a callback routed to a queue this worker does not consume,
and all the worker's CPU from the send to the last callback's publish, divided by the
messages, is set against Celery's own no-op retry at the same pace, on the same worker
right after: one chain of no-op retries a tracked message, each run at the moment (from
its phase's start) that one of the message's checks was made. So the floor has as many
runs as the trackings made checks, spread over the same seconds in the same bunches, and
pays the worker's idle costs (its timers, beats and polls) for as long. A second such
floor (``follow_up_*``) makes each chain do what the trackings do besides their checks'
runs: carry the callback's signature in its arguments and, on its last run, send that
callback with a tracking's result (read from Redis: one more round trip a chain, about
0.1 ms). The tracking's figure counts the callback's publish
as its own cost; this one shows how much of the difference that publish is.

It also reports the floor of earlier versions of this benchmark (``burst_*``): one chain
a message, all sent at once with the schedule's countdowns without jitter (5, 7.5, 10 s),
as many runs each as the trackings' checks a message, rounded. Its runs come in three
bunches of ``--messages`` within about 13 s, and Celery's per-run costs drop when a
worker receives and acknowledges many tasks at once: that floor is cheaper per run than
the same runs spread as the checks are. The figures go to
``bench/results/cpu_per_message.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Task, signature

from bench.sampling import proc_reading
from bench.workload import free_port, wait_until
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.tools.embedded import PersistentRedis
from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer
from smsbat_tracker.tools.workers import worker_process
from smsbat_tracker.worker import app

RESULTS = Path(__file__).parent / "results"
COUNTDOWN = 1.0  # the floor's retry countdown: the checks' own pace
# A result one of the trackings' callbacks got: what the floor's follow-ups are sent with.
FOLLOW_UP_RESULT = "bench:follow_up:result"


@app.task(bind=True, name="bench.noop_retry", max_retries=None, ignore_result=True)
def noop_retry(
    self: Task[Any, Any],
    left: int,
    done_key: str,
    countdowns: list[float] | None = None,
    follow_up: dict[str, Any] | None = None,
) -> None:
    """Retry ``left`` more times with a countdown (the next of ``countdowns``, the last one
    again once they run out; else :data:`COUNTDOWN`), then send ``follow_up`` (a signature
    dict, when one is given) with the result stored at :data:`FOLLOW_UP_RESULT`, and count
    itself done."""
    if left > 0:
        pace = list(countdowns or [COUNTDOWN])
        countdown = pace.pop(0) if len(pace) > 1 else pace[0]
        raise self.retry(
            kwargs={
                "left": left - 1,
                "done_key": done_key,
                "countdowns": pace,
                "follow_up": follow_up,
            },
            countdown=countdown,
        )
    if follow_up is not None:
        result = json.loads(app.engine.redis.get(FOLLOW_UP_RESULT) or "{}")
        signature(follow_up, app=app).apply_async((result,))
    app.engine.redis.incr(done_key)


def _wait(predicate: Any, timeout: float) -> None:
    wait_until(predicate, timeout, "bench.cpu_floor: a phase did not finish in time")


@contextlib.contextmanager
def sandboxed_app(seed: int, **overrides: Any) -> Iterator[tuple[Settings, SandboxServer]]:
    """A sandbox and a Redis, and the package's app configured for them with the default
    settings but ``overrides``; yields the settings and the sandbox."""
    sandbox = SandboxServer(SandboxConfig(seed=seed))
    sandbox.start()
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory() as data,
        PersistentRedis(free_port(), data) as server,
    ):
        stack.callback(sandbox.stop)
        settings = load_settings(
            redis_url=server.url, base_url=sandbox.url, api_key=sandbox.config.api_key, **overrides
        )
        app.reconfigure(settings)
        yield settings, sandbox


@contextlib.contextmanager
def _measured_worker(
    seed: int, log_name: str, **overrides: Any
) -> Iterator[tuple[subprocess.Popen[bytes], SandboxServer]]:
    """A sandbox, a Redis and one default prefork worker (2 children) with ``overrides``,
    started and settled; yields the worker's process and the sandbox."""
    with (
        sandboxed_app(seed, **overrides) as (settings, sandbox),
        worker_process(
            settings,
            concurrency=2,
            pool="prefork",
            log_path=str(RESULTS / log_name),
            imports=("bench.cpu_floor",),
        ) as worker,
    ):
        redis_client = app.engine.redis
        _wait(lambda: redis_client.zcard(app.engine.keys.holders()) > 0, 60)
        time.sleep(2.0)  # let start-up settle before the first reading
        yield worker, sandbox


def run(chains: int, checks: int) -> dict[str, Any]:
    """Both phases on one worker; the figures."""
    with _measured_worker(
        1,
        "cpu-floor-worker.log",
        first_delay=1.0,
        max_delay=1.0,
        jitter=0.0,
        rate_limit=0.0,
        deadline=checks + 30.0,
    ) as (worker, sandbox):
        redis_client = app.engine.redis

        before = proc_reading(worker.pid).cpu
        for _ in range(chains):
            noop_retry.delay(checks, "bench:floor:done")
        _wait(lambda: int(redis_client.get("bench:floor:done") or 0) >= chains, checks * 3 + 60)
        floor_cpu = proc_reading(worker.pid).cpu - before
        floor_retries = chains * checks

        ids = [sandbox.state.create_scripted([("processing", 0)]) for _ in range(chains)]

        def polls() -> int:
            return sum(sandbox.state.truth(m)["polls"] for m in ids)

        before = proc_reading(worker.pid).cpu
        started = time.monotonic()
        for m in ids:
            track_message.delay(m)
        _wait(lambda: polls() >= chains * checks, checks * 3 + 60)
        check_cpu = proc_reading(worker.pid).cpu - before
        checked = polls()
        wall = time.monotonic() - started
    per_retry = floor_cpu / floor_retries
    per_check = check_cpu / checked
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "worker": "celery worker --pool prefork --concurrency 2",
        "chains": chains,
        "floor_retries": floor_retries,
        "floor_cpu_ms_per_retry": round(per_retry * 1000, 2),
        "checks": checked,
        "check_cpu_ms_per_check": round(per_check * 1000, 2),
        "ratio": round(per_check / per_retry, 3),
        "checks_wall_s": round(wall, 1),
    }


def _paced_floor(
    pid: int, paces: list[list[float]], done_key: str, follow_up: dict[str, Any] | None = None
) -> tuple[float, float]:
    """One no-op chain a pace, a run at each of its moments (seconds from the start); the
    worker's CPU seconds and the wall seconds until every chain is done."""
    redis_client = app.engine.redis
    before = proc_reading(pid).cpu
    started = time.monotonic()
    for pace in paces:
        gaps = [b - a for a, b in itertools.pairwise(pace)]
        noop_retry.apply_async(
            (len(pace) - 1, done_key, gaps or [COUNTDOWN], follow_up),
            countdown=max(0.0, pace[0] - (time.monotonic() - started)),
        )
    _wait(lambda: int(redis_client.get(done_key) or 0) >= len(paces), 180)
    return proc_reading(pid).cpu - before, time.monotonic() - started


def _a_callback_result(redis_client: Any) -> dict[str, Any]:
    """The result the first callback in :data:`CALLBACK_QUEUE` was sent with."""
    message = json.loads(redis_client.lindex(CALLBACK_QUEUE, 0))
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    result: dict[str, Any] = args[0]
    return result


# The default schedule's countdowns, without jitter: 5 s, then x1.5 up to 10 s.
DEFAULT_PACE = [5.0, 7.5, 10.0]
CALLBACK_QUEUE = "bench-callbacks"  # not consumed by the measured worker


def run_per_message(messages: int, seed: int) -> dict[str, Any]:
    """The per-message figure (see the module's docstring)."""
    import random

    from smsbat_tracker.tools.recipes import record_outcome

    rng = random.Random(seed)
    with _measured_worker(seed, "cpu-per-message-worker.log", deadline=60.0) as (
        worker,
        sandbox,
    ):
        redis_client = app.engine.redis

        ids = [
            sandbox.state.create_scripted(
                [("processing", 0), ("delivered", rng.uniform(8.0, 25.0))]
            )
            for _ in range(messages)
        ]
        callback = record_outcome.s(label="cpu").set(queue=CALLBACK_QUEUE)
        before = proc_reading(worker.pid).cpu
        sent_at, started = time.time(), time.monotonic()
        for m in ids:
            track_message.delay(m, on_delivered=callback)
        _wait(lambda: redis_client.llen(CALLBACK_QUEUE) >= messages, 180)
        tracking_cpu = proc_reading(worker.pid).cpu - before
        tracking_wall = time.monotonic() - started
        # When each message's checks were made, from the send.
        paces = [[t - sent_at for t in sandbox.state.truth(m)["poll_times"]] for m in ids]
        checks = sum(len(p) for p in paces)
        paces = [p for p in paces if p]  # a message settled without a check has no chain

        # Celery's floor at the same pace: a no-op run at each check's moment.
        floor_cpu, floor_wall = _paced_floor(worker.pid, paces, "bench:pace:done")
        # The same, each chain ending with the follow-up a tracking sends: the callback's
        # signature rides in every run's arguments (as a tracking's does), and the last run
        # sends it with a result one of the trackings' callbacks got.
        redis_client.set(FOLLOW_UP_RESULT, json.dumps(_a_callback_result(redis_client)))
        follow_cpu, _ = _paced_floor(worker.pid, paces, "bench:follow:done", dict(callback))

        # The earlier versions' floor: every chain at once, countdowns without jitter.
        chains, left = messages, max(1, round(checks / messages) - 1)
        before = proc_reading(worker.pid).cpu
        for _ in range(chains):
            noop_retry.delay(left, "bench:burst:done", DEFAULT_PACE)
        _wait(lambda: int(redis_client.get("bench:burst:done") or 0) >= chains, 180)
        burst_cpu = proc_reading(worker.pid).cpu - before
        burst_runs = chains * (left + 1)
    per_message = tracking_cpu / messages
    floor_per_message = floor_cpu / messages
    burst_per_run = burst_cpu / burst_runs
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "worker": "celery worker --pool prefork --concurrency 2, default settings, deadline 60 s",
        "messages": messages,
        "checks": checks,
        "checks_per_message": round(checks / messages, 2),
        "cpu_ms_per_message": round(per_message * 1000, 2),
        "tracking_wall_s": round(tracking_wall, 1),
        "floor_runs": checks,
        "floor_cpu_ms_per_run": round(floor_cpu / checks * 1000, 2),
        "floor_cpu_ms_per_message": round(floor_per_message * 1000, 2),
        "floor_wall_s": round(floor_wall, 1),
        "ratio": round(per_message / floor_per_message, 3),
        "follow_up_floor_cpu_ms_per_message": round(follow_cpu / messages * 1000, 2),
        "follow_up_ratio": round(tracking_cpu / follow_cpu, 3),
        "burst_floor_runs": burst_runs,
        "burst_floor_cpu_ms_per_run": round(burst_per_run * 1000, 2),
        "burst_ratio": round(per_message / (checks / messages * burst_per_run), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_floor", description=__doc__)
    parser.add_argument("--chains", type=int, default=50, help="chains, and messages")
    parser.add_argument("--checks", type=int, default=20, help="retries, and checks, each")
    parser.add_argument(
        "--per-message", action="store_true", help="CPU per tracked message at the default pace"
    )
    parser.add_argument("--messages", type=int, default=150, help="--per-message: messages")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.per_message:
        figures = run_per_message(args.messages, args.seed)
        (RESULTS / "cpu_per_message.json").write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures, indent=2))
        return 0
    figures = run(args.chains, args.checks)
    (RESULTS / "cpu_floor.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
