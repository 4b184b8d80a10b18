"""What an operator sees in Flower: the real ``celery flower`` watching a real worker.

Flower runs as a subprocess (``celery -A smsbat_tracker.worker flower``) on the test Redis,
with a login (``FLOWER_BASIC_AUTH``), beside a ``celery worker`` subprocess
(:func:`smsbat_tracker.tools.workers.worker_process`). No task is sent before Flower has heard the
worker's heartbeat, so it sees every task event. The tests read Flower's HTTP API as an
operator's tools would: ``/api/tasks`` (the task list) and ``/api/task/info/<id>``.

Flower keeps one record per task id, merged from all of that task's events: a retried task
keeps its id, and after it succeeds its record still holds the last retry's ``exception``
(the reason) beside the ``result``.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from bench.operator_view import launch_flower, stop_flower

from smsbat_tracker.celery.campaigns import track_campaign
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.workers import worker_process
from tests.conftest import recorded, wait_for

pytest.importorskip(
    "flower", reason="Flower is not installed: pip install 'smsbat-tracker[flower]'"
)

pytestmark = pytest.mark.slow

LOGIN = ("user", "password")
TRACK = "smsbat_tracker.track_message"
TICK = "smsbat_tracker.campaign_tick"
# A retry that carries no reason: what Flower showed before the tasks passed one.
REASONLESS = re.compile(r"Retry\(Retry\(\.\.\.\), None,")
# A reason: what was seen, and when the task runs again.
REASON = re.compile(r"NextRun\('[^']+; [^']+ in \d+\.\d s'\)")


class Flower:
    """A running Flower subprocess and an HTTP client on it."""

    def __init__(self, proc: subprocess.Popen[bytes], client: httpx.Client, log: Path) -> None:
        self.proc = proc
        self.client = client
        self.log = log

    def get(self, path: str, *, login: bool = True, **params: Any) -> httpx.Response:
        """``GET path``, with the login unless ``login`` is false."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"flower exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        return self.client.get(path, params=params, auth=LOGIN if login else None)

    def tasks(self, **params: Any) -> dict[str, dict[str, Any]]:
        """The task list (``/api/tasks``): task id -> what Flower shows of it."""
        response = self.get("/api/tasks", **params)
        response.raise_for_status()
        return dict(response.json())

    def task(self, task_id: str) -> dict[str, Any]:
        """One task's page (``/api/task/info/<id>``)."""
        response = self.get(f"/api/task/info/{task_id}")
        response.raise_for_status()
        return dict(response.json())

    def knows(self, workers: Iterable[str]) -> bool:
        """Whether Flower has received events (a heartbeat at least) from all ``workers``."""
        try:
            response = self.get("/api/workers", status="true")
        except httpx.TransportError:  # not listening yet
            return False
        return response.status_code == 200 and set(workers) <= set(response.json())


@contextlib.contextmanager
def flower_process(settings: Settings, log: Path) -> Iterator[Flower]:
    """``celery -A smsbat_tracker.worker flower`` on a free port, with the login."""
    proc, port = launch_flower(settings, log, LOGIN)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            yield Flower(proc, client, log)
    finally:
        stop_flower(proc)


@contextlib.contextmanager
def watched_worker(
    settings: Settings, tracker_app: Any, tmp_path: Path, *, pool: str, concurrency: int
) -> Iterator[Flower]:
    """A worker subprocess and Flower watching it; yields once Flower has heard the worker.

    The worker sends a heartbeat event every 2 s: one that reached Flower proves that its
    event receiver listens, so no task event sent from then on is missed.
    """
    with (
        worker_process(
            settings, pool=pool, concurrency=concurrency, log_path=str(tmp_path / "worker.log")
        ),
        flower_process(settings, tmp_path / "flower.log") as flower,
    ):
        replies = wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        workers = {name for reply in replies for name in reply}
        wait_for(lambda: flower.knows(workers), timeout=60, interval=0.2)
        yield flower


@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 8), ("prefork", 2)])
def test_flower_shows_each_outcome_first_and_why_each_check_ran_again(
    pool: str,
    concurrency: int,
    settings: Settings,
    tracker_app: Any,
    sandbox: SandboxServer,
    tmp_path: Path,
) -> None:
    """Flower, as an operator sees it, for trackings that end three different ways.

    - Its API needs the login: 401 without it, 200 with it.
    - Each tracking is one task in the list, and its result starts with the outcome
      (``{'outcome': 'delivered', ...``), so outcomes tell apart at a glance.
    - A task that checked again says why, in Flower's ``exception`` field, which keeps
      the reason of its last retry after the task succeeded: what it saw and when it runs
      again (``NextRun('processing; next check in 1.0 s')``, ``NextRun('the request
      failed; retry in 1.0 s')``, ``NextRun('no turn to ask the API yet; ...')``), never a
      reason-less ``Retry(Retry(...), None, 8.04)``.

    Both pools show the bare ``NextRun(...)``: under the thread pool (the one the Procfile
    and compose run) Celery's ``task-retried`` event takes the ``Retry`` itself for the
    reason (billiard's ``ExceptionInfo`` wraps the exception), and the tracker's ``Retry``
    shows as its reason.
    """
    with watched_worker(
        settings, tracker_app, tmp_path, pool=pool, concurrency=concurrency
    ) as flower:
        assert flower.get("/api/tasks", login=False).status_code == 401
        assert flower.get("/api/tasks").status_code == 200

        delivered = sandbox.state.create_scripted([("processing", 0), ("delivered", 1.5)])
        # Checked at 0.2 s (processing), ~1.2 s (a 500: the request failed), ~2.2 s (final).
        undeliverable = sandbox.state.create_scripted([("processing", 0), ("undeliverable", 1.0)])
        sandbox.state.set_faults(message_faults={undeliverable: ["ok", "500"]})
        never_final = sandbox.state.create_scripted([("processing", 0)])
        tasks = {
            "delivered": track_message.delay(delivered, deadline=10).id,
            "undeliverable": track_message.delay(undeliverable, deadline=10).id,
            "timeout": track_message.delay(never_final, deadline=3).id,
        }
        assert flower.get(f"/api/task/info/{tasks['delivered']}", login=False).status_code == 401

        def all_done() -> dict[str, dict[str, Any]] | None:
            listed = flower.tasks(taskname=TRACK)
            done = all(listed.get(t, {}).get("state") == "SUCCESS" for t in tasks.values())
            return listed if done else None

        listed = wait_for(all_done, timeout=30, interval=0.2)
        pages = {outcome: flower.task(task_id) for outcome, task_id in tasks.items()}

    # The task list: each tracking's result starts with its outcome.
    ids = {"delivered": delivered, "undeliverable": undeliverable, "timeout": never_final}
    for outcome, task_id in tasks.items():
        result = listed[task_id]["result"]
        assert result.startswith(f"{{'outcome': '{outcome}', 'message_id': '{ids[outcome]}'"), (
            result
        )
    assert len({listed[t]["result"][:30] for t in tasks.values()}) == 3

    # The task's page: a retried task's last reason stays beside its result.
    reasons = {outcome: page["exception"] for outcome, page in pages.items()}
    for outcome, page in pages.items():
        assert page["state"] == "SUCCESS"
        assert page["retries"] >= 1, page
        assert page["result"] == listed[tasks[outcome]]["result"]
        assert REASON.search(reasons[outcome]), reasons
        assert not REASONLESS.search(reasons[outcome]), reasons
    assert "NextRun('processing; next check in " in reasons["delivered"], reasons
    assert "NextRun('the request failed; retry in " in reasons["undeliverable"], reasons
    assert all(r.startswith("NextRun(") for r in reasons.values()), reasons


def test_flower_lists_one_task_per_campaign_tick_chain(
    settings: Settings,
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """A campaign's ticks are retries of one task per tick chain, not a task per tick.

    However many ticks ran, Flower lists at most ``SMSBAT_CAMPAIGN_TICKS`` campaign_tick
    tasks for the campaign, each retried with its reason (``... next tick in ...``).
    """
    campaign = f"flower-{uuid.uuid4().hex[:8]}"
    ids = [
        sandbox.state.create_scripted([("processing", 0), ("delivered", 1.0 + 0.4 * i)])
        for i in range(8)
    ]
    with watched_worker(settings, tracker_app, tmp_path, pool="threads", concurrency=8) as flower:
        track_campaign.delay(campaign, ids, deadline=15, on_report=record_outcome.s(label=campaign))
        [entry] = wait_for(lambda: recorded(redis_client, campaign), timeout=40)

        def chains_done() -> dict[str, dict[str, Any]] | None:
            ticks = {
                task_id: task
                for task_id, task in flower.tasks(taskname=TICK).items()
                if campaign in (task.get("args") or "")
            }
            return ticks if ticks and all(t["state"] == "SUCCESS" for t in ticks.values()) else None

        ticks = wait_for(chains_done, timeout=30, interval=0.2)

    assert entry["result"]["outcomes"]["delivered"] == len(ids)
    assert 1 <= len(ticks) <= settings.campaign_ticks, ticks
    runs = sum(task["retries"] + 1 for task in ticks.values())
    assert runs > len(ticks), ticks  # some chain ticked again under its own task id
    retried = [task for task in ticks.values() if task["retries"]]
    assert retried
    for task in retried:
        assert REASON.fullmatch(task["exception"] or ""), task["exception"]
        assert "final; next tick in " in task["exception"], task["exception"]
