"""A worker SIGKILLed mid-track loses nothing: another worker finishes, one callback fires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.recipes import record_outcome
from smsbat_tracker.sandbox import SandboxServer
from smsbat_tracker.tasks import track_message
from tests.conftest import recorded, wait_for

pytestmark = pytest.mark.slow


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": settings.redis_url,
            "SMSBAT_BASE_URL": settings.base_url,
            "SMSBAT_API_KEY": "sandbox-key",
            "SMSBAT_FIRST_DELAY": str(settings.first_delay),
            "SMSBAT_MAX_DELAY": str(settings.max_delay),
            "SMSBAT_BACKOFF_FACTOR": str(settings.backoff_factor),
            "SMSBAT_JITTER": "0",
            "SMSBAT_RATE_LIMIT": "0",
            "SMSBAT_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
            "SMSBAT_UNACKED_RESTORE_INTERVAL": "1",
        }
    )
    return env


def spawn_worker(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "smsbat_tracker.worker",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        env=worker_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture
def kill_settings(make_settings: Any) -> Settings:
    # A short visibility timeout so the dead worker's task comes back within the test.
    return make_settings(visibility_timeout=4.0, max_delay=1.0, unacked_restore_interval=1.0)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_sigkilled_worker_loses_no_message(
    kill_settings: Settings,
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Kill -9 the worker holding a countdown; a fresh worker completes it, callback once."""
    tracker_app.reconfigure(kill_settings)
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 3.0)])
    label = uuid.uuid4().hex[:8]
    track_message.delay(mid, deadline=30, on_delivered=record_outcome.s(label=label))

    first = spawn_worker(kill_settings, "first")
    procs.append(first)
    # Mid-track: it has checked once and holds the next check as an unacked countdown.
    wait_for(lambda: sandbox.state.truth(mid)["polls"] >= 1, timeout=20)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    polls_at_kill = sandbox.state.truth(mid)["polls"]

    second = spawn_worker(kill_settings, "second")
    procs.append(second)
    [entry] = wait_for(lambda: recorded(redis_client, label), timeout=40)
    assert entry["result"]["outcome"] == "delivered"
    assert sandbox.state.truth(mid)["polls"] > polls_at_kill  # the second worker checked
    # Nothing more arrives once the outcome is recorded.
    wait_for(lambda: redis_client.llen("celery") == 0, timeout=10)
    assert len(recorded(redis_client, label)) == 1
