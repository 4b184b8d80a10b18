"""Soak run: a steady send rate for a set time, on a default worker; memory over time.

``python -m bench.soak`` starts a Redis-protocol server, the simulated API (in this
process) and one worker as an operator starts it by default (``celery -A
smsbat_tracker.worker worker``: prefork, 2 processes here), with the default settings.
It then sends ``--rate`` messages a second for ``--minutes``, each tracked with
``track_message`` (``--deadline`` s) with a callback for every outcome; each message is
final 2-25 s after it is sent (90 % delivered), a few never (they time out).

Every ``--interval`` s it samples the worker's RSS per process, its CPU, Redis
``used_memory`` and the outcomes so far. At the end it checks every outcome against the
API's truth (right, wrong, lost, doubled), fits the worker's RSS after the warm-up
(``--warmup`` minutes) against the trackings finished (MB per 10,000 trackings), and
measures what a finished message leaves in Redis (``used_memory`` per finished message,
and the keys of a sample of them). The figures go to ``bench/results/soak.json`` and a plot
of RSS and Redis memory over time to ``bench/results/soak.png``.

``--floor`` also runs Celery's own floor on a fresh worker of the same kind, after the
soak, for the same time: chains of a no-op task that retries itself on a tracking's
schedule, at the same rate; its RSS plateau is what Celery itself keeps.

``--tracemalloc DIR`` starts tracemalloc in each worker child and dumps a snapshot after
1,000 and 5,000 trackings finished in that child (``bench.soak_probe``); the run then
compares them (top growth by line) into the JSON. It slows the children: use it apart
from the RSS run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.sampling import _rss, _stat, _tree
from bench.workload import wait_until
from smsbat_tracker.config import load_settings
from smsbat_tracker.log import configure_logging
from smsbat_tracker.tools.embedded import redis_url_or_embedded
from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer
from smsbat_tracker.tools.workers import worker_process

RESULTS = Path(__file__).parent / "results"
LABEL = "soak"
# A tracking's schedule, for the no-op floor: the default first delay and backoff.
FLOOR_COUNTDOWNS = (5.0, 7.5, 10.0)


def _timeline(rng: random.Random) -> tuple[list[tuple[str, float]], str]:
    """A message's script and the outcome it must get."""
    if rng.random() < 0.03:
        return [("processing", 0.0)], "timeout"
    final = "delivered" if rng.random() < 0.9 else "undeliverable"
    return [("processing", 0.0), (final, rng.uniform(2.0, 25.0))], final


def _worker_sample(root: int) -> dict[str, Any]:
    """RSS per process (bytes) and CPU seconds of the worker's process tree."""
    rss: dict[str, int] = {}
    cpu = 0.0
    for pid in _tree(root):
        stat = _stat(pid)
        if stat is None:
            continue
        cpu += stat[1]
        rss[str(pid)] = _rss(pid)
    return {"rss": rss, "cpu": cpu}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 3 or max(xs) == min(xs):
        return None
    return statistics.linear_regression(xs, ys).slope


class Sender(threading.Thread):
    """Sends ``rate`` trackings a second until ``until`` (monotonic), each on its script."""

    def __init__(self, send: Any, rate: float, until: float) -> None:
        super().__init__(name="soak-sender", daemon=True)
        self.send = send
        self.rate = rate
        self.until = until
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        start = time.monotonic()
        try:
            while True:
                due = start + self.sent / self.rate
                if due >= self.until:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.send()
                self.sent += 1
        except BaseException as exc:  # reported by the run
            self.error = exc


def _drain(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """Take every entry the callbacks recorded so far (the list stays near empty, so that
    the bench's own bookkeeping does not count as the tracker's Redis memory)."""
    pipe = client.pipeline(transaction=True)
    pipe.lrange(key, 0, -1)
    pipe.delete(key)
    raw, _ = pipe.execute()
    return [json.loads(item) for item in raw]


def _key_bytes(client: redis.Redis, ids: list[str], prefix: str) -> dict[str, Any]:
    """What the keys of finished messages hold (MEMORY USAGE, all samples), per message."""
    by_kind: Counter[str] = Counter()
    keys = 0
    for m in ids:
        for key in client.scan_iter(match=f"{prefix}:*{{{m}}}*", count=1000):
            kind = str(key).split(":")[1]
            by_kind[kind] += int(client.memory_usage(key, samples=0) or 0)
            keys += 1
    n = max(1, len(ids))
    return {
        "messages": len(ids),
        "keys_per_message": round(keys / n, 2),
        "bytes_per_message": round(sum(by_kind.values()) / n, 1),
        "bytes_by_key": {k: round(v / n, 1) for k, v in sorted(by_kind.items())},
    }


def soak(args: argparse.Namespace, url: str, sandbox: SandboxServer) -> dict[str, Any]:
    """The soak phase on one default worker; its figures and samples."""
    rng = random.Random(args.seed)
    settings = load_settings(redis_url=url, base_url=sandbox.url, api_key=sandbox.config.api_key)
    os.environ.update(settings.to_env())
    from smsbat_tracker.celery.names import TRACK_TASK
    from smsbat_tracker.tools.recipes import record_outcome
    from smsbat_tracker.worker import app

    app.reconfigure(settings)
    # The app's own task: the sender thread's current app is Celery's default, not this one.
    track_message = app.tasks[TRACK_TASK]
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    expected: dict[str, str] = {}
    got: dict[str, list[str]] = {}
    lock = threading.Lock()
    callback = record_outcome.s(label=LABEL)
    recorded_key = f"{settings.key_prefix}:recorded:{LABEL}"

    def send() -> None:
        timeline, outcome = _timeline(rng)
        mid = sandbox.state.create_scripted(timeline)
        with lock:
            expected[mid] = outcome
        track_message.delay(
            mid,
            deadline=args.deadline,
            on_delivered=callback,
            on_failed=callback,
            on_timeout=callback,
        )

    def collect() -> None:
        for entry in _drain(client, recorded_key):
            result = entry["result"]
            got.setdefault(result["message_id"], []).append(result["outcome"])

    env: dict[str, str] = {}
    if args.tracemalloc:
        env["SMSBAT_SOAK_TRACEMALLOC"] = str(Path(args.tracemalloc).resolve())
        os.environ.update(env)
    samples: list[dict[str, Any]] = []
    log_path = RESULTS / "soak-worker.log"
    log_path.write_text("")
    imports = ("bench.soak_probe",) if args.tracemalloc else ()
    with worker_process(
        settings,
        concurrency=args.concurrency,
        pool="prefork",
        log_path=str(log_path),
        imports=imports,
    ) as worker:
        holders = app.engine.keys.holders()
        _until(lambda: client.zcard(holders) > 0, 60, "the worker did not start")
        time.sleep(3.0)  # start-up settles before the baseline
        base_memory = int(client.info("memory")["used_memory"])
        base = _worker_sample(worker.pid)
        started = time.monotonic()
        sender = Sender(send, args.rate, started + args.minutes * 60)
        sender.start()

        def sample(phase: str) -> None:
            collect()
            reading = _worker_sample(worker.pid)
            memory = client.info("memory")
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "phase": phase,
                    "sent": sender.sent,
                    "finished": len(got),
                    "rss": reading["rss"],
                    "cpu": round(reading["cpu"] - base["cpu"], 2),
                    "redis_used_memory": int(memory["used_memory"]),
                    "redis_keys": int(client.dbsize()),
                }
            )
            last = samples[-1]
            print(
                f"[{last['t']:7.0f} s] sent {last['sent']:6d}  finished {last['finished']:6d}  "
                f"worker RSS {sum(last['rss'].values()) / 2**20:6.1f} MB  "
                f"redis {last['redis_used_memory'] / 2**20:6.1f} MB",
                flush=True,
            )

        next_at = started
        while sender.is_alive():
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            sample("send")
        if sender.error is not None:
            raise sender.error
        # Everything sent is final within the deadline (and its grace).
        drain_until = time.monotonic() + args.deadline + 60
        while time.monotonic() < drain_until and len(got) < sender.sent:
            time.sleep(2.0)
            collect()
        _until(lambda: client.zcard(app.engine.keys.due()) == 0, 60, "the due index stayed full")
        time.sleep(2.0)
        sample("end")
        end_memory = int(client.info("memory")["used_memory"])
        finished_ids = [m for m in got if m in expected]
        sample_ids = random.Random(1).sample(finished_ids, min(200, len(finished_ids)))
        keys = _key_bytes(client, sample_ids, settings.key_prefix)
        polls = sum(sandbox.state.truth(m)["polls"] for m in expected)
        cpu = samples[-1]["cpu"]
    client.close()
    app.close_engine()

    wrong = sorted(m for m, outcomes in got.items() if outcomes[0] != expected.get(m))
    doubled = sorted(m for m, outcomes in got.items() if len(outcomes) > 1)
    lost = sorted(set(expected) - set(got))
    after = [s for s in samples if s["t"] >= args.warmup * 60 and s["phase"] == "send"]
    growth = _slope(
        [float(s["finished"]) for s in after], [sum(s["rss"].values()) / 2**20 for s in after]
    )
    per_child: dict[str, float | None] = {}
    for pid in samples[-1]["rss"]:
        points = [(s["finished"], s["rss"][pid] / 2**20) for s in after if pid in s["rss"]]
        slope = _slope([float(x) for x, _ in points], [y for _, y in points])
        per_child[pid] = round(slope * 10_000, 2) if slope is not None else None
    return {
        "sent": sender.sent,
        "finished": len(got),
        "right": sum(1 for m, o in got.items() if o[0] == expected.get(m)),
        "wrong": len(wrong),
        "lost": len(lost),
        "doubled": len(doubled),
        "wrong_ids": wrong[:20],
        "lost_ids": lost[:20],
        "api_requests": polls,
        "worker_cpu_s": cpu,
        "cpu_ms_per_message": round(cpu * 1000 / max(1, len(got)), 2),
        "cpu_ms_per_check": round(cpu * 1000 / max(1, polls), 2),
        "rss_mb_start": round(sum(base["rss"].values()) / 2**20, 1),
        "rss_mb_end": round(sum(samples[-1]["rss"].values()) / 2**20, 1),
        "rss_growth_mb_per_10k_after_warmup": (
            round(growth * 10_000, 2) if growth is not None else None
        ),
        "rss_growth_mb_per_10k_by_process": per_child,
        "trackings_after_warmup": (after[-1]["finished"] - after[0]["finished"]) if after else 0,
        "redis_bytes_per_finished_message": round((end_memory - base_memory) / max(1, len(got)), 1),
        "redis_keys_of_finished_messages": keys,
        "samples": samples,
    }


def floor(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Celery's own floor: no-op chains retrying on a tracking's schedule, same rate."""
    settings = load_settings(redis_url=url, base_url="http://127.0.0.1:9", api_key="unused")
    os.environ.update(settings.to_env())
    from bench.soak_probe import noop_tracking
    from smsbat_tracker.worker import app

    app.reconfigure(settings)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    samples: list[dict[str, Any]] = []
    log_path = RESULTS / "soak-floor-worker.log"
    with worker_process(
        settings,
        concurrency=args.concurrency,
        pool="prefork",
        log_path=str(log_path),
        imports=("bench.soak_probe",),
    ) as worker:
        _until(lambda: client.zcard(app.engine.keys.holders()) > 0, 60, "no floor worker")
        time.sleep(3.0)
        started = time.monotonic()
        sender = Sender(
            lambda: noop_tracking.delay(len(FLOOR_COUNTDOWNS)),
            args.rate,
            started + args.minutes * 60,
        )
        sender.start()
        next_at = started
        while sender.is_alive():
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            reading = _worker_sample(worker.pid)
            done = int(client.get("bench:soak:floor:done") or 0)
            samples.append(
                {"t": round(time.monotonic() - started, 1), "finished": done, "rss": reading["rss"]}
            )
            print(
                f"[floor {samples[-1]['t']:7.0f} s] finished {done:6d}  "
                f"worker RSS {sum(reading['rss'].values()) / 2**20:6.1f} MB",
                flush=True,
            )
    client.close()
    app.close_engine()
    after = [s for s in samples if s["t"] >= args.warmup * 60]
    growth = _slope(
        [float(s["finished"]) for s in after], [sum(s["rss"].values()) / 2**20 for s in after]
    )
    return {
        "rss_mb_end": round(sum(samples[-1]["rss"].values()) / 2**20, 1) if samples else None,
        "rss_growth_mb_per_10k_after_warmup": (
            round(growth * 10_000, 2) if growth is not None else None
        ),
        "samples": samples,
    }


def _until(predicate: Any, timeout: float, what: str) -> None:
    wait_until(predicate, timeout, f"bench.soak: {what}")


def compare_snapshots(directory: Path, top: int = 20) -> dict[str, Any]:
    """The growth from each child's 1,000th to its 5,000th tracking, by line."""
    out: dict[str, Any] = {}
    from bench.soak_probe import SNAPSHOTS

    first_n, last_n = SNAPSHOTS[0], SNAPSHOTS[-1]
    for early in sorted(directory.glob(f"child-*-{first_n}.snap")):
        late = early.with_name(early.name.replace(f"-{first_n}.", f"-{last_n}."))
        if not late.exists():
            continue
        first = tracemalloc.Snapshot.load(str(early))
        second = tracemalloc.Snapshot.load(str(late))
        stats = second.compare_to(first, "lineno")
        total = sum(s.size_diff for s in stats)
        out[early.name.split("-")[1]] = {
            "growth_bytes": total,
            "top": [
                {"where": str(s.traceback), "size_diff": s.size_diff, "count_diff": s.count_diff}
                for s in stats[:top]
            ],
        }
    return out


def plot(figures: dict[str, Any], path: Path, warmup: float) -> None:
    """RSS per process and Redis used_memory over time, the floor's RSS beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = figures["soak"]["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    minutes = [s["t"] / 60 for s in samples]
    pids = sorted({pid for s in samples for pid in s["rss"]})
    for pid in pids:
        top.plot(
            minutes, [s["rss"].get(pid, float("nan")) / 2**20 for s in samples], label=f"pid {pid}"
        )
    top.plot(minutes, [sum(s["rss"].values()) / 2**20 for s in samples], "k", label="worker total")
    floor_run = figures.get("floor")
    if floor_run and floor_run["samples"]:
        top.plot(
            [s["t"] / 60 for s in floor_run["samples"]],
            [sum(s["rss"].values()) / 2**20 for s in floor_run["samples"]],
            "k--",
            label="no-op floor total",
        )
    top.axvline(warmup, color="grey", linestyle=":")
    top.set_ylabel("RSS (MB)")
    top.set_title(
        f"Soak: {figures['args']['rate']:g} messages/s, default worker "
        f"(prefork -c {figures['args']['concurrency']})"
    )
    top.legend(loc="upper left", fontsize="small")
    bottom.plot(minutes, [s["redis_used_memory"] / 2**20 for s in samples], "tab:red")
    bottom.axvline(warmup, color="grey", linestyle=":")
    bottom.set_ylabel("Redis used_memory (MB)")
    bottom.set_xlabel("minutes")
    twin = bottom.twinx()
    twin.plot(minutes, [s["finished"] for s in samples], "tab:green", alpha=0.5)
    twin.set_ylabel("trackings finished", color="tab:green")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--rate", type=float, default=10.0, help="sends a second")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to send")
    parser.add_argument("--warmup", type=float, default=10.0, help="minutes before the fit")
    parser.add_argument("--deadline", type=float, default=30.0, help="each tracking's deadline")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="also run the no-op floor")
    parser.add_argument("--tracemalloc", metavar="DIR", help="snapshot each child (slow)")
    parser.add_argument("--name", default="soak", help="result files' name (default soak)")
    args = parser.parse_args(argv)
    configure_logging(level="WARNING")  # not this process's own enqueue lines
    RESULTS.mkdir(exist_ok=True)
    if args.tracemalloc:
        Path(args.tracemalloc).mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "worker": f"celery -A smsbat_tracker.worker worker --pool prefork -c {args.concurrency}",
    }
    sandbox = SandboxServer(SandboxConfig(seed=args.seed))
    sandbox.start()
    try:
        with redis_url_or_embedded() as url:
            figures["soak"] = soak(args, url, sandbox)
            if args.floor:
                figures["floor"] = floor(args, url)
    finally:
        sandbox.stop()
    if args.tracemalloc:
        figures["tracemalloc"] = compare_snapshots(Path(args.tracemalloc))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2))
    plot(figures, RESULTS / f"{args.name}.png", args.warmup)
    summary = {k: v for k, v in figures["soak"].items() if k != "samples"}
    if "floor" in figures:
        summary["floor"] = {k: v for k, v in figures["floor"].items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
