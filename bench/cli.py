"""``python -m bench``: run the modes on the same workload, print the table, write JSON.

Every mode faces the same sandbox mix (median time-to-final 4 s, p95 40 s, 5 %
undeliverable, 2 % never final; same seed), created right before it starts:

- a: the provider documentation's blocking loop (check at once, every 5 s, give up at 60 s),
  one thread per message, plain httpx;
- b: ``track_message`` on a real ``celery worker`` subprocess (threads pool), polling only;
- c: as b, plus the sandbox pushing every status change to the webhook receiver;
- d: reserved for the campaign mode (see :data:`bench.modes.PLANNED`).

Progress goes to stderr, the report to stdout, the figures to ``bench/results/``. Every run
is bounded: a mode stops at its deadline plus a margin, and every process the bench starts
is stopped on the way out, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench import probe, workload
from bench.modes import MODES, PLANNED, BenchContext, unavailable_reason
from bench.report import (
    figures,
    machine,
    now_iso,
    ratios,
    render,
    targets,
    write_json,
)
from smsbat_tracker.tools.workers import PACKAGE_APP

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the documented polling loop against smsbat-tracker "
        "on one simulated workload.",
    )
    parser.add_argument(
        "--messages", type=int, default=200, help="messages per mode (default %(default)s)"
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated mode letters (default: every available one: "
        + ", ".join(f"{k} = {v.title}" for k, v in MODES.items())
        + ")",
    )
    parser.add_argument("--seed", type=int, default=1, help="sandbox seed (default %(default)s)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        help="smsbat-tracker's deadline in s, modes b, c and d (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="worker threads (or processes, with --pool prefork), modes b and c "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--shared-worker",
        action="store_true",
        help="modes b, c and d: run the callbacks on the tracking worker (default: tracking "
        "on its own queue and the callbacks on a worker of their own, as the README advises)",
    )
    parser.add_argument(
        "--pool",
        choices=("threads", "prefork"),
        default="threads",
        help="the Celery pool of modes b and c (default %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 2,
        help="worker processes: mode d's prefork children, and modes b and c's threads "
        "workers (default: one per core, %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="SMSBAT_RATE_LIMIT for the worker, status requests/s, 0 = off "
        "(default: the settings' default)",
    )
    parser.add_argument(
        "--slow-rate",
        type=float,
        default=0.0,
        help="modes b and c: share of status answers that come only after the read "
        "timeout (default %(default)s)",
    )
    parser.add_argument(
        "--worker-app",
        default=PACKAGE_APP,
        help="modes b and c: the module `celery -A` loads for the workers, e.g. "
        "bench.user_app, a user's own Celery app after init_app (default %(default)s)",
    )
    parser.add_argument(
        "--probe-throughput",
        action="store_true",
        help="only measure how many status checks/s the sandbox serves here",
    )
    return parser


def _select(spec: str | None) -> tuple[list[str], dict[str, str]]:
    """The letters to run and the ones skipped (with why); exits on a bad request."""
    skipped: dict[str, str] = {}
    if spec is None:
        chosen = []
        for letter, mode in MODES.items():
            reason = unavailable_reason(mode)
            if reason:
                skipped[letter] = reason
            else:
                chosen.append(letter)
        return chosen, skipped
    chosen = [s.strip().lower() for s in spec.split(",") if s.strip()]
    for letter in chosen:
        if letter in PLANNED:
            raise SystemExit(f"mode {letter} is planned, not implemented: {PLANNED[letter]}")
        if letter not in MODES:
            raise SystemExit(f"unknown mode {letter!r}; known: {', '.join(MODES)}")
        reason = unavailable_reason(MODES[letter])
        if reason:
            raise SystemExit(f"mode {letter} cannot run: {reason}")
    return [m for m in MODES if m in chosen], skipped


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # Unwind like Ctrl-C, so that every context manager stops what it started.
    raise KeyboardInterrupt


def _run_probe(args: argparse.Namespace, log_dir: Path) -> int:
    print("probing status checks/s against a sandbox process...", file=sys.stderr)
    result = probe.probe_throughput(seed=args.seed, log_dir=log_dir)
    text = probe.render_probe(result)
    print(text)
    path = write_json(
        {"kind": "probe", "at": now_iso(), "machine": machine(), **result}, prefix="probe-"
    )
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and return the exit code.

    0 when every selected mode ran (whether or not the targets hold), 1 when a mode failed,
    130 when interrupted, after every process the bench started has been stopped.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: every process the bench started is stopped", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.messages, args.deadline, args.concurrency, args.processes) <= 0:
        raise SystemExit("--messages, --deadline, --concurrency and --processes must be positive")
    signal.signal(signal.SIGTERM, _on_sigterm)
    from smsbat_tracker.log import configure_logging

    # The library's log lines stay on stderr, out of the table.
    configure_logging(level="WARNING")
    log_dir = Path(tempfile.mkdtemp(prefix="smsbat-bench-"))
    if args.probe_throughput:
        return _run_probe(args, log_dir)

    letters, skipped = _select(args.modes)
    if not letters:
        raise SystemExit("no mode to run")
    print(
        f"modes {','.join(letters)}, {args.messages} messages each, seed {args.seed}; "
        f"logs in {log_dir}",
        file=sys.stderr,
    )
    from smsbat_tracker.tools.embedded import redis_url_or_embedded

    owned = not os.environ.get("REDIS_URL")  # read before a mode sets it for its worker
    started_at = now_iso()
    begin = time.monotonic()
    figs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with redis_url_or_embedded() as redis_url:
        ctx = BenchContext(
            messages=args.messages,
            seed=args.seed,
            deadline=args.deadline,
            concurrency=args.concurrency,
            pool=args.pool,
            shared_worker=args.shared_worker,
            processes=args.processes,
            redis_url=redis_url,
            redis_owned=owned,
            log_dir=log_dir,
            rate_limit=args.rate_limit,
            out=sys.stderr,
            slow_rate=args.slow_rate,
            worker_app=args.worker_app,
        )
        for letter in letters:
            ctx.say(f"mode {letter}: {MODES[letter].title}")
            try:
                run = MODES[letter].runner(ctx)
            except Exception as exc:  # one broken mode must not hide the others' figures
                failed[letter] = f"{type(exc).__name__}: {exc}"
                ctx.say(f"mode {letter} failed:\n{traceback.format_exc()}")
                continue
            figs[letter] = figures(run)
            fig = figs[letter]
            ctx.say(
                f"mode {letter}: {fig['calls_per_message']:.2f} calls/msg, "
                f"p95 delay {fig['detection_delay_s']['p95']} s, "
                f"{fig['right']}/{fig['messages']} right, {fig['wall_s']:.0f} s"
            )
    rat = ratios(figs)
    tgts = targets(figs, rat)
    print(render(figs, rat, tgts, {**skipped, **failed}))
    data = {
        "kind": "modes",
        "started_at": started_at,
        "finished_at": now_iso(),
        "duration_s": round(time.monotonic() - begin, 1),
        "command": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "args": vars(args),
        "machine": machine(),
        "workload": {
            "median_final_s": workload.MEDIAN_FINAL,
            "p95_final_s": workload.P95_FINAL,
            "undeliverable_rate": workload.UNDELIVERABLE_RATE,
            "never_final_rate": workload.NEVER_FINAL_RATE,
            "type": "sms",
        },
        "modes": figs,
        "ratios_vs_a": rat,
        "targets": tgts,
        "skipped": skipped,
        "failed": failed,
        "log_dir": str(log_dir),
    }
    path = write_json(data)
    print(f"\nresults: {path}", file=sys.stderr)
    return 1 if failed else 0
