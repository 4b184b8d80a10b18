"""What an operator sees of a run: Flower's task list, the workers' metrics, their logs.

``bench.failover --operator`` uses it: Flower (``celery -A smsbat_tracker.worker flower``,
with a login) watches the workers from the start; each worker serves its metrics on a port
of its own. After the run it reports the trackings Flower does not show in a final state
with their outcome, the metric counts against the trackings, the ERROR lines of the
workers' logs (Celery's one-line "consumer: Cannot connect" apart, which the README
allows) and the bytes of INFO log per tracking.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import free_port
from smsbat_tracker.config import Settings

__all__ = [
    "FINAL",
    "Flower",
    "flower_figures",
    "flower_process",
    "launch_flower",
    "log_figures",
    "metric_figures",
    "scrape",
    "stop_flower",
]

LOGIN = ("operator", "bench-login")
TRACK = "smsbat_tracker.track_message"
# Flower's final task states.
FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
# Celery's own line while the broker is away: allowed at ERROR (one line, no traceback).
CANNOT_CONNECT = "consumer: Cannot connect"


class Flower:
    """A Flower subprocess and a client of its API."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0, auth=LOGIN)

    def knows(self, count: int) -> bool:
        """Whether Flower has heard at least ``count`` workers."""
        try:
            answer = self.client.get("/api/workers", params={"status": "true"})
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and len(answer.json()) >= count

    def trackings(self) -> dict[str, list[dict[str, Any]]]:
        """Every ``track_message`` task Flower shows, by the message id it tracks."""
        answer = self.client.get("/api/tasks", params={"taskname": TRACK, "limit": 100_000})
        answer.raise_for_status()
        by_message: dict[str, list[dict[str, Any]]] = {}
        for task in answer.json().values():
            message_id = _message_id(task)
            if message_id is not None:
                by_message.setdefault(message_id, []).append(task)
        return by_message


def _message_id(task: dict[str, Any]) -> str | None:
    with contextlib.suppress(ValueError, SyntaxError, TypeError):
        args = ast.literal_eval(task.get("args") or "()")
        if args:
            return str(args[0])
        kwargs = ast.literal_eval(task.get("kwargs") or "{}")
        if isinstance(kwargs, dict) and "message_id" in kwargs:
            return str(kwargs["message_id"])
    return None


def launch_flower(
    settings: Settings, log: Path, login: tuple[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    """``celery -A smsbat_tracker.worker flower`` on a free loopback port, with ``login``
    (its API is never open); the process (a session of its own) and its port."""
    port = free_port()
    env = {**os.environ, **settings.to_env(), "FLOWER_BASIC_AUTH": ":".join(login)}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "smsbat_tracker.worker",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return proc, port


def stop_flower(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group and wait; SIGKILL it if it has not exited in 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def flower_process(settings: Settings, log: Path) -> Iterator[Flower]:
    """Flower (:func:`launch_flower`) and a client of its API, for a run."""
    proc, port = launch_flower(settings, log, LOGIN)
    flower = Flower(proc, port)
    try:
        yield flower
    finally:
        flower.client.close()
        stop_flower(proc)


def flower_figures(flower: Flower, truth: dict[str, Any]) -> dict[str, Any]:
    """The trackings Flower shows in a final state with their outcome, and those it does
    not: a tracking is right when one of its tasks succeeded with the outcome and none of
    them stays unfinished."""
    shown = flower.trackings()
    unfinished, without_outcome = [], []
    for message_id in truth:
        tasks = shown.get(message_id, [])
        if any(t.get("state") not in FINAL for t in tasks):
            unfinished.append(
                [(t.get("uuid"), t.get("state")) for t in tasks if t.get("state") not in FINAL]
            )
        elif not any("'outcome'" in str(t.get("result")) for t in tasks):
            without_outcome.append(message_id)
    return {
        "trackings": len(truth),
        "tasks_shown": sum(len(v) for k, v in shown.items() if k in truth),
        "unfinished": len(unfinished),
        "unfinished_examples": unfinished[:5],
        "without_outcome": len(without_outcome),
    }


def scrape(port: int) -> dict[str, float]:
    """A worker's metrics: sample name (with sorted labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_figures(ports: list[int]) -> dict[str, Any]:
    """The counts an operator would check against the trackings, summed over the workers."""
    total: dict[str, float] = {}
    for port in ports:
        for name, value in scrape(port).items():
            total[name] = total.get(name, 0.0) + value
    outcomes = sum(v for k, v in total.items() if k.startswith("smsbat_outcomes_total"))
    redrives = {k: v for k, v in total.items() if k.startswith("smsbat_redrives_total")}
    return {
        "trackings_started": total.get("smsbat_trackings_started_total", 0.0),
        "outcomes": outcomes,
        "redrives": redrives,
    }


def log_figures(logs: Path, trackings: int) -> dict[str, Any]:
    """ERROR lines (Celery's "Cannot connect" apart), lines that are not JSON, and the
    bytes of INFO log per tracking, over every worker log in ``logs``."""
    errors: list[str] = []
    cannot_connect = 0
    not_json = 0
    info_bytes = 0
    for path in sorted(logs.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                not_json += 1
                continue
            level = str(event.get("level", "")).lower()
            if level == "info":
                info_bytes += len(line.encode()) + 1
            if level in ("error", "critical"):
                if CANNOT_CONNECT in str(event.get("event")):
                    cannot_connect += 1
                else:
                    errors.append(str(event.get("event"))[:200])
    return {
        "error_lines": len(errors),
        "error_examples": errors[:5],
        "cannot_connect_error_lines": cannot_connect,
        "not_json_lines": not_json,
        "info_bytes_per_tracking": round(info_bytes / max(1, trackings)),
    }
