"""The Celery app: settings that make countdowns safe on Redis, start-up errors, log context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from smsbat_tracker.celery.integration import DEFAULT_QUEUE, TrackerStep, tracker_routes
from smsbat_tracker.celery.names import TRACK_PRIORITY, TRACKER_TASKS
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.errors import ConfigError, UnsupportedVersion
from smsbat_tracker.log import configure_logging
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.worker import celery_config
from tests.conftest import WORKER_COMMAND, recorded, run_worker_cli, wait_for, worker_env


def test_celery_settings_make_countdowns_safe(settings: Settings) -> None:
    """Visibility timeout set explicitly and far above every countdown; late acks; JSON only."""
    conf = celery_config(settings)
    visibility = conf["broker_transport_options"]["visibility_timeout"]
    assert visibility == settings.visibility_timeout
    assert visibility >= 4 * settings.max_delay
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["accept_content"] == ["json"]
    assert conf["task_serializer"] == "json"
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True
    assert "task_time_limit" not in conf  # the deadline is the task's own business


def test_a_prefork_child_is_replaced_past_the_memory_cap(
    make_settings: Callable[..., Settings],
) -> None:
    """SMSBAT_WORKER_MAX_MEMORY (MiB) is Celery's worker_max_memory_per_child (KiB), on by
    default; 0 turns it off."""
    assert celery_config(make_settings())["worker_max_memory_per_child"] == 400 * 1024
    assert celery_config(make_settings(worker_max_memory=0))["worker_max_memory_per_child"] is None


def test_worker_refuses_to_start_with_bad_settings(tmp_path: Path) -> None:
    """`celery -A smsbat_tracker.worker worker` with a bad variable exits naming it."""
    proc = run_worker_cli(tmp_path, SMSBAT_API_KEY="k", SMSBAT_MAX_DELAY="ten")
    assert proc.returncode != 0
    assert "SMSBAT_MAX_DELAY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_task_log_lines_carry_task_and_message(
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every line a tracking task logs names the task id, the task name and the message."""
    configure_logging(json=True, level="DEBUG")  # a check's own line is at DEBUG
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 0.3)])
    result = track_message.delay(mid, on_delivered=record_outcome.s())
    wait_for(lambda: recorded(redis_client))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    ours = [e for e in events if str(e.get("event", "")).startswith("track.")]
    assert {"track.enqueued", "track.check", "track.final", "track.callback"} <= {
        e["event"] for e in ours
    }
    for event in ours:
        assert event["message_id"] == mid
        assert event["task_id"] == result.id
        assert event["task_name"] == "smsbat_tracker.track_message"


def test_a_starting_worker_builds_its_engine_before_the_first_task(
    worker: Any, tracker_app: Any
) -> None:
    """The threads worker's engine exists as soon as it runs: the first tasks never pay for it."""
    engine = tracker_app.tracker._engine
    assert engine is not None
    assert engine.redis.ping() is True


def test_warm_up_skips_a_prefork_parent_and_runs_in_its_children(tracker_app: Any) -> None:
    """The tracker's bootstep warms only pools that run tasks in-process; a prefork pool's
    children warm themselves (worker_process_init)."""
    from celery import signals

    tracker_app.close_engine()
    step = TrackerStep(SimpleNamespace(app=tracker_app, pool_cls="prefork"))
    try:
        step.start(SimpleNamespace(pool_cls="prefork"))
        assert tracker_app.tracker._engine is None
        signals.worker_process_init.send(sender=None)
        assert tracker_app.tracker._engine is not None
    finally:
        signals.worker_process_init.disconnect(step._warm_child, dispatch_uid=step._warm_uid)
    tracker_app.close_engine()
    TrackerStep(SimpleNamespace(app=tracker_app, pool_cls="threads")).start(
        SimpleNamespace(pool_cls="threads")
    )
    assert tracker_app.tracker._engine is not None


def test_a_worker_of_an_app_without_the_tracker_is_untouched() -> None:
    """The bootstep does nothing on a worker whose app never called init_app."""
    from celery import Celery

    other = Celery("other", set_as_current=False)
    step = TrackerStep(SimpleNamespace(app=other, pool_cls="threads"))
    assert step.tracker is None
    step.start(SimpleNamespace(pool_cls="threads"))
    step.stop(SimpleNamespace())
    other.close()


def test_a_worker_on_an_unknown_celery_stops_at_start(
    tracker_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracker's bootstep checks the Celery its Retry patch was made for: on another
    version the worker stops at start (UnsupportedVersion), not at the first retry."""
    from smsbat_tracker.celery import compat
    from smsbat_tracker.celery.compat import retry

    monkeypatch.setattr(compat.metadata, "version", lambda package: "5.8.0")
    retry.install.cache_clear()
    try:
        with pytest.raises(UnsupportedVersion, match=r"celery 5\.8\.0"):
            TrackerStep(SimpleNamespace(app=tracker_app, pool_cls="threads"))
    finally:
        retry.install.cache_clear()


def test_reconfigure_moves_celerys_connection_pools_to_the_new_broker(
    make_settings: Callable[..., Settings],
) -> None:
    """``TrackerApp.reconfigure`` drops the connection and producer pools Celery built for
    the old broker (its private ``_pool`` and ``amqp._producer_pool``, which Celery's own
    after-fork resets the same way): the next publish goes to the new REDIS_URL."""
    from smsbat_tracker.worker import create_app

    app = create_app(make_settings(redis_url="redis://127.0.0.1:1/0"))
    try:
        assert app.pool.connection.as_uri().endswith("127.0.0.1:1/0")
        assert app.amqp.producer_pool.connections.connection.as_uri().endswith("127.0.0.1:1/0")
        app.reconfigure(make_settings(redis_url="redis://127.0.0.1:2/0"))
        assert app.pool.connection.as_uri().endswith("127.0.0.1:2/0")
        assert app.amqp.producer_pool.connections.connection.as_uri().endswith("127.0.0.1:2/0")
    finally:
        app.close_engine()
        app.close()


def test_warm_up_with_redis_down_logs_and_lets_the_worker_start(
    make_settings: Callable[..., Settings],
) -> None:
    """An unreachable Redis at start-up is logged, not raised: the consumer retries it."""
    from smsbat_tracker.worker import create_app

    tracker = create_app(make_settings(redis_url="redis://127.0.0.1:1/0"))
    try:
        with capture_logs() as logs:
            tracker.warm()
    finally:
        tracker.close_engine()
    assert [e["event"] for e in logs] == ["worker.warm_failed"]
    assert logs[0]["error"] in {"ConnectionError", "OperationalError"}


def test_tracker_tasks_keep_the_default_queue_unless_told(settings: Settings) -> None:
    """Without SMSBAT_QUEUE only the check priority is routed and no queue list is set."""
    assert tracker_routes(settings) == {
        "smsbat_tracker.track_message": {"priority": TRACK_PRIORITY},
        "smsbat_tracker.campaign_tick": {"priority": TRACK_PRIORITY},
    }
    from smsbat_tracker.worker import create_app

    app = create_app(settings)
    try:
        assert app.conf.task_queues is None
        assert app.conf.task_routes == (tracker_routes(settings),)
    finally:
        app.close()


def test_smsbat_queue_routes_every_tracker_task(make_settings: Callable[..., Settings]) -> None:
    """SMSBAT_QUEUE routes the four tracker tasks; a worker without -Q consumes both queues."""
    from smsbat_tracker.worker import create_app

    settings = make_settings(queue="tracking")
    routes = tracker_routes(settings)
    assert set(routes) == set(TRACKER_TASKS)
    assert {route["queue"] for route in routes.values()} == {"tracking"}
    assert routes["smsbat_tracker.track_message"]["priority"] == TRACK_PRIORITY
    app = create_app(settings)
    try:
        assert [q.name for q in app.conf.task_queues] == [DEFAULT_QUEUE, "tracking"]
    finally:
        app.close()


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "semi;colon"])
def test_a_bad_queue_name_stops_start_up(make_settings: Callable[..., Settings], bad: str) -> None:
    """A bad SMSBAT_QUEUE is named in the error."""
    with pytest.raises(ConfigError, match="SMSBAT_QUEUE"):
        make_settings(queue=bad)


def test_tracking_on_its_own_queue_leaves_callbacks_to_other_workers(
    make_settings: Callable[..., Settings],
    settings: Settings,
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """A worker on SMSBAT_QUEUE alone tracks to the end; the callback waits in the default queue."""
    from celery.contrib.testing.worker import start_worker

    app = tracker_app
    app.reconfigure(make_settings(queue="tracking"))
    try:
        mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 0.2)])
        with start_worker(
            app,
            pool="threads",
            concurrency=2,
            queues=["tracking"],
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=10.0,
        ):
            track_message.delay(mid, on_delivered=record_outcome.s())
            wait_for(lambda: app.engine.outcome(mid))
            waiting = wait_for(lambda: redis_client.lrange(DEFAULT_QUEUE, 0, -1))
        assert recorded(redis_client) == []  # nobody consumes the default queue here
        [message] = [json.loads(raw) for raw in waiting]
        assert message["headers"]["task"] == "smsbat_tracker.recipes.record_outcome"
        assert redis_client.llen("tracking") == 0
    finally:
        app.reconfigure(settings)


def test_worker_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    """A worker calls the API: without credentials it exits naming SMSBAT_API_KEY (code
    that only enqueues, and the webhook receiver, load without them)."""
    proc = run_worker_cli(tmp_path)
    assert proc.returncode != 0
    assert "SMSBAT_API_KEY: no credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_package_worker_registers_no_recipe_task_unless_asked() -> None:
    """A production worker of the package's app knows the tracker's four tasks and no demo
    recipe; ``--include smsbat_tracker.tools.recipes`` (what the demo does) adds them."""
    probe = (
        "import sys\n"
        "from smsbat_tracker.worker import app\n"
        "sys.argv[1:] and __import__(sys.argv[1])\n"
        "app.loader.import_default_modules()\n"
        "print(sorted(t for t in app.tasks if t.startswith('smsbat')))\n"
    )
    env = {**os.environ, "SMSBAT_API_KEY": "sandbox-key"}

    def registered(*include: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", probe, *include],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        return list(json.loads(done.stdout.strip().replace("'", '"')))

    assert registered() == sorted(TRACKER_TASKS)
    assert "smsbat_tracker.recipes.record_outcome" in registered("smsbat_tracker.tools.recipes")


def test_a_run_that_loses_redis_is_a_retry_with_its_reason_not_an_error(
    tracker_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis going away under a tracking run (a failover, a restart) is a fault the tracker
    heals: the run ends as a retry whose reason says so (what Flower shows), with one
    WARNING line and no traceback, and the due index re-drives the tracking. A task the
    due index does not cover still fails."""
    import time

    from smsbat_tracker.celery import track
    from smsbat_tracker.celery.track import settle_message

    def away(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(track, "run_check", away)
    with capture_logs() as logs:
        result = track_message.apply(args=("abc123",), kwargs={"enqueued_at": time.time()})
    assert result.state == "RETRY"
    assert (
        repr(result.result) == "NextRun('Redis away (ConnectionError); the re-driver resumes it')"
    )
    [event] = [e for e in logs if e["event"] == "task.redis_away"]
    assert event["log_level"] == "warning"
    assert event["error"] == "ConnectionError"
    assert "exc_info" not in event
    monkeypatch.setattr(track, "engine_of", away)
    assert settle_message.apply(args=("abc123",)).state == "FAILURE"


@pytest.mark.slow
def test_a_default_worker_logs_under_1_kb_a_tracking_and_every_line_as_json(
    make_settings: Callable[..., Settings],
    sandbox: SandboxServer,
    tracker_app: Any,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """``celery -A smsbat_tracker.worker worker -l INFO`` with its output in a file (not a
    terminal): every line is JSON, the start-up banner (one ``worker.started`` line) and
    the warning about running as root included, Celery's per-task lines are off, and 20
    trackings with their callbacks log at most 1 KB each (what was logged after the
    worker answered a ping). ``SMSBAT_TASK_LOG_LINES=true`` brings Celery's lines back."""
    from smsbat_tracker.tools.workers import worker_process

    def run(settings: Settings, label: str) -> tuple[list[dict[str, Any]], float]:
        log = tmp_path / f"{label}.log"
        with worker_process(settings, concurrency=4, log_path=str(log)):
            wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
            started = log.stat().st_size
            ids = [sandbox.state.create_scripted([("processing", 0), ("delivered", 1.5)])]
            ids += [sandbox.state.create_scripted([("delivered", 0.5)]) for _ in range(19)]
            for mid in ids:
                track_message.delay(mid, on_delivered=record_outcome.s(label=label))
            wait_for(lambda: len(recorded(redis_client, label)) == 20, timeout=60)
            # Read while it runs: Celery prints "worker: Warm shutdown" as it stops.
            text = log.read_bytes()
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return lines, (len(text) - started) / 20

    lines, per_tracking = run(make_settings(), "quiet")
    events = [line["event"] for line in lines]
    assert events.count("worker.started") == 1
    assert not [e for e in events if e.startswith("Task ")]
    assert per_tracking <= 1024, per_tracking
    loud, _ = run(make_settings(task_log_lines=True), "loud")
    assert [e for e in (line["event"] for line in loud) if e.endswith("] received")]


@pytest.mark.slow
def test_a_worker_waiting_for_redis_logs_warnings_not_errors(tmp_path: Path) -> None:
    """A worker whose Redis is out of reach retries, as Celery does, and says so in JSON
    WARNING lines (its own and Celery's "consumer: Cannot connect", a fault it heals): an
    alert on ERROR does not page on a failover. Stopped, its "Warm shutdown" message is a
    JSON line too: every line it writes, stdout and stderr, is JSON."""
    from bench.workload import free_port

    env = worker_env(SMSBAT_API_KEY="k", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    proc = subprocess.Popen(
        [*WORKER_COMMAND, "-l", "INFO"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[dict[str, Any]] = []
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            if raw.strip():
                lines.append(json.loads(raw))
            if sum("Cannot connect" in str(e["event"]) for e in lines) >= 2:
                break
        proc.terminate()
        lines += [json.loads(raw) for raw in proc.stdout if raw.strip()]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    cannot = [e for e in lines if str(e["event"]).startswith("consumer: Cannot connect")]
    assert cannot
    assert {e["level"] for e in cannot} == {"warning"}
    assert [e["event"] for e in lines if e["level"] in ("error", "critical")] == []
    assert "worker: Warm shutdown (MainProcess)" in [e["event"] for e in lines]


def test_a_child_forked_while_the_engine_is_being_built_builds_its_own(
    settings: Settings,
) -> None:
    """A prefork child forked while a thread of its parent holds the engine's lock (the
    re-driver's first beat builds the parent's engine as the pool starts) gets a fresh
    lock: it builds its own engine instead of waiting for good on a thread it does not
    have."""
    from celery import Celery

    from smsbat_tracker.celery.tracker import Tracker

    tracker = Tracker(Celery("fork-lock"), settings)
    with tracker._engine_lock:  # a parent's thread building the engine at fork time
        pid = os.fork()
        if pid == 0:  # the child: exit 0 once it could take the lock
            os._exit(0 if tracker._engine_lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
