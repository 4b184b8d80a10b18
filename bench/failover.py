"""Sentinel run: trackings through Redis master failovers, as an operator would see them.

``python -m bench.failover`` starts one Redis master, one replica and three sentinels
(quorum 2, down-after 1 s; Debian's ``redis-server`` and ``redis-sentinel``), the simulated
API in this process and two default workers (``celery worker -c 2``, prefork) on a
``sentinel://`` ``REDIS_URL``, all other settings at their defaults but the deadline
(``--deadline``, 40 s). Each of ``--failovers`` rounds tracks ``--messages`` messages
(final 1-20 s after the send, a few never final), SIGKILLs the master once a third of them
have their callback, waits for the sentinels to promote the replica and for every callback,
then starts the old master again (the sentinels make it the new replica).

It counts, per message, the callbacks *sent* (distinct task ids), the callbacks *run twice*
under one task id, the *lost* (none 60 s after the deadline) and the *wrong*, and each
outcome's lateness (from the final status at the API, or the deadline, to the callback).
The figures go to ``bench/results/failover.json`` and the terminal.

``--operator`` adds what an operator sees (:mod:`bench.operator_view`): Flower watching the
workers from the start, each worker's metrics on a port of its own, and their logs; the
run then also reports the trackings Flower does not show finished with their outcome, the
metric counts against the trackings, the ERROR lines and the INFO bytes per tracking.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.chaos import RESULTS, Workers, _reruns
from bench.operator_view import flower_figures, flower_process, log_figures, metric_figures
from bench.sentinel_cluster import DOWN_AFTER_MS, SentinelCluster
from bench.workload import free_port
from smsbat_tracker.config import load_settings
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer


def _timeline(rng: random.Random) -> tuple[list[tuple[str, float]], str | None, float | None]:
    if rng.random() < 0.04:
        return [("processing", 0.0)], None, None
    final = rng.choice(("delivered",) * 8 + ("undeliverable", "permanenterror"))
    at = rng.uniform(1.0, 20.0)
    return [("processing", 0.0), (final, at)], final, at


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.disable(logging.INFO)
    rng = random.Random(args.seed)
    RESULTS.mkdir(exist_ok=True)
    logs = args.out.parent / f"{args.out.stem}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    events: list[dict[str, Any]] = []
    truth: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as root:
        cluster = SentinelCluster(root=Path(root), password=secrets.token_hex(12))
        sandbox = SandboxServer(SandboxConfig(seed=args.seed))
        try:
            cluster.start()
            sandbox.start()
            settings = load_settings(
                redis_url=cluster.url,
                base_url=sandbox.url,
                api_key=sandbox.config.api_key,
                deadline=args.deadline,
            )
            os.environ.update(settings.to_env())
            from smsbat_tracker.celery.track import track_message
            from smsbat_tracker.tools.recipes import record_outcome
            from smsbat_tracker.worker import app

            app.reconfigure(settings)
            client = redis_client(settings, decode_responses=True)
            recorded = f"{settings.key_prefix}:recorded:failover"
            ports = [free_port(), free_port()] if args.operator else None
            workers = Workers(settings, logs, concurrency=args.concurrency, metrics_ports=ports)
            stack = contextlib.ExitStack()
            operator: dict[str, Any] = {}
            try:
                flower = (
                    stack.enter_context(flower_process(settings, logs / "flower.log"))
                    if args.operator
                    else None
                )
                workers.start_all(app)
                if flower is not None:  # every task event from here on reaches it
                    _wait(lambda: flower.knows(2), 60)
                t0 = time.time()
                done = 0
                for round_ in range(args.failovers):
                    sig = record_outcome.s(label="failover")
                    for _ in range(args.messages):
                        timeline, final, at = _timeline(rng)
                        mid = sandbox.state.create_scripted(timeline)
                        truth[mid] = {
                            "final": final,
                            "final_at": time.time() + at if at is not None else None,
                            "enqueued_at": time.time(),
                        }
                        track_message.delay(mid, on_delivered=sig, on_failed=sig, on_timeout=sig)
                    target = done + args.messages // 3
                    _wait(lambda t=target: _len(client, recorded) >= t, 60)
                    cluster.kill_master()
                    events.append({"at": round(time.time() - t0, 2), "master": "killed"})
                    _wait(lambda: cluster.master_port_now() == cluster.replica_port, 60)
                    events.append({"at": round(time.time() - t0, 2), "master": "promoted"})
                    done += args.messages
                    _wait(lambda d=done: _len(client, recorded) >= d, args.deadline + 60)
                    events.append({"at": round(time.time() - t0, 2), "round": round_ + 1})
                    cluster.restart_killed()
                    events.append({"at": round(time.time() - t0, 2), "replica": "back"})
                    print(f"t={time.time() - t0:5.1f}s {events[-3:]}", file=sys.stderr)
                time.sleep(10.0)  # anything doubled arrives now, or not at all
                entries = [json.loads(x) for x in client.lrange(recorded, 0, -1)]
                if flower is not None and ports is not None:
                    operator = {
                        "flower": flower_figures(flower, truth),
                        "metrics": metric_figures(ports),
                        "logs": log_figures(logs, len(truth)),
                    }
            finally:
                workers.close()
                stack.close()
                client.close()
        finally:
            sandbox.stop()
            cluster.stop()
    summary = _analyse(truth, entries, events, args)
    if operator:
        summary["operator"] = operator
    return summary


def _len(client: Any, key: str) -> int:
    try:
        return int(client.llen(key))
    except Exception:  # the master is away: not yet
        return 0


def _wait(predicate: Any, timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            print(f"gave up waiting after {timeout} s", file=sys.stderr)
            return
        time.sleep(0.2)


def _analyse(
    truth: dict[str, dict[str, Any]],
    entries: list[dict[str, Any]],
    events: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    by_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_message[entry["result"]["message_id"]].append(entry)
    lost = [m for m in truth if m not in by_message]
    doubled = [m for m, es in by_message.items() if len({e["task_id"] for e in es}) > 1]
    wrong, lateness = [], []
    for mid, es in by_message.items():
        t = truth[mid]
        first = min(es, key=lambda e: e["recorded_at"])
        if first["result"]["outcome"] != (t["final"] or "timeout"):
            wrong.append(mid)
        knowable = t["final_at"] if t["final"] else t["enqueued_at"] + args.deadline
        lateness.append(first["recorded_at"] - knowable)
    lateness.sort()

    def q(p: float) -> float | None:
        return (
            round(lateness[min(len(lateness) - 1, int(p * len(lateness)))], 2) if lateness else None
        )

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "failovers": args.failovers,
        "messages_per_failover": args.messages,
        "down_after_ms": DOWN_AFTER_MS,
        "events": events,
        "lost": len(lost),
        "lost_ids": lost[:20],
        "doubled_callbacks": len(doubled),
        "doubled_ids": doubled[:20],
        "wrong": len(wrong),
        "wrong_ids": wrong[:20],
        **_reruns(entries, []),
        "lateness_s": {
            "p50": q(0.5),
            "p95": q(0.95),
            "p99": q(0.99),
            "max": round(lateness[-1], 2) if lateness else None,
            "mean": round(statistics.fmean(lateness), 2) if lateness else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--messages", type=int, default=100, help="trackings per failover")
    parser.add_argument("--deadline", type=float, default=40.0, help="SMSBAT_DEADLINE")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--operator", action="store_true", help="Flower, metrics and logs as an operator sees them"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "failover.json")
    args = parser.parse_args(argv)
    summary = run(args)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = (
        summary["lost"] == summary["doubled_callbacks"] == summary["run_twice"] == 0
        and summary["wrong"] == 0
        and (summary["lateness_s"]["p99"] or 0) <= 15
        and (summary["lateness_s"]["max"] or 0) <= 30
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
