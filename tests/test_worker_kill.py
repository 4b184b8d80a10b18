"""A worker SIGKILLed mid-track loses nothing: another worker finishes, one callback fires."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.demo import worker_process
from smsbat_tracker.recipes import record_outcome
from smsbat_tracker.sandbox import SandboxServer
from smsbat_tracker.tasks import track_message
from tests.conftest import recorded, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def kill_settings(make_settings: Any) -> Settings:
    # A short visibility timeout so the dead worker's task comes back within the test.
    return make_settings(visibility_timeout=4.0, max_delay=1.0, unacked_restore_interval=1.0)


def test_sigkilled_worker_loses_no_message(
    kill_settings: Settings,
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """Kill -9 the worker holding a countdown; a fresh worker completes it, callback once."""
    tracker_app.reconfigure(kill_settings)
    label = uuid.uuid4().hex[:8]
    with worker_process(kill_settings, concurrency=2) as first:
        # Sent once the worker is up, so that it is killed long before the message is
        # delivered (a worker killed after running the callback would see it redelivered:
        # callbacks run at least once under acks_late).
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 4.0)])
        track_message.delay(mid, deadline=30, on_delivered=record_outcome.s(label=label))
        # Mid-track: it has checked once and holds the next check as an unacked countdown.
        wait_for(lambda: sandbox.state.truth(mid)["polls"] >= 1, timeout=20)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    polls_at_kill = sandbox.state.truth(mid)["polls"]
    assert not recorded(redis_client, label)  # killed mid-track, before any callback

    # Threads, not prefork: with this test's 4 s visibility timeout, any message a worker
    # holds unacked for 4 s (a prefork pool still starting) would be delivered twice.
    with worker_process(kill_settings, concurrency=2):
        [entry] = wait_for(lambda: recorded(redis_client, label), timeout=40)
        # Nothing more arrives once the outcome is recorded.
        wait_for(lambda: redis_client.llen("celery") == 0, timeout=10)
    assert entry["result"]["outcome"] == "delivered"
    assert sandbox.state.truth(mid)["polls"] > polls_at_kill  # the second worker checked
    assert len(recorded(redis_client, label)) == 1
