"""Crashes with the default durability settings: a whole worker SIGKILLed, Redis restarted.

The visibility timeout stays at its default hour: what resumes the tracking within seconds
is the re-driver, and these tests time it against ``SMSBAT_REDRIVE_AFTER``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from smsbat_tracker.celery.campaigns import get_campaign_report, track_campaign
from smsbat_tracker.celery.redrive import HEARTBEAT
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.tools.embedded import PersistentRedis
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.workers import worker_process
from tests.conftest import recorded, wait_for

pytestmark = pytest.mark.slow


def _bound(settings: Settings) -> float:
    """How late a lost check may run: the re-drive bound, a sweep, a check's own wait."""
    return settings.redrive_after + 2 * HEARTBEAT + settings.max_delay + 5.0


def test_a_sigkilled_worker_loses_nothing_and_resumes_within_the_bound(
    settings: Settings, tracker_app: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Kill -9 a whole worker (main process and children) holding a countdown.

    With the default one-hour visibility timeout, another worker finishes the tracking
    within the re-drive bound, and the callback is sent once.
    """
    assert settings.visibility_timeout == 3600  # the default: no shortcut
    label = uuid.uuid4().hex[:8]
    with worker_process(settings, concurrency=2, pool="prefork") as first:
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 3.0)])
        track_message.delay(mid, deadline=40, on_delivered=record_outcome.s(label=label))
        wait_for(lambda: sandbox.state.truth(mid)["polls"] >= 1, timeout=20)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.time()
    assert not recorded(redis_client, label)
    with worker_process(settings, concurrency=2, pool="prefork"):
        [entry] = wait_for(lambda: recorded(redis_client, label), timeout=_bound(settings) + 20)
        wait_for(lambda: redis_client.zcard("smsbat:due") == 0, timeout=10)
    assert entry["result"]["outcome"] == "delivered"
    assert entry["recorded_at"] - killed_at <= _bound(settings)
    assert len(recorded(redis_client, label)) == 1


@pytest.fixture
def restartable(
    make_settings: Callable[..., Settings],
) -> Iterator[tuple[PersistentRedis, Settings]]:
    """A Redis with AOF of the test's own, which it may SIGKILL and restart."""
    from bench.workload import free_port

    with tempfile.TemporaryDirectory() as data, PersistentRedis(free_port(), data) as server:
        yield server, make_settings(redis_url=server.url)


def test_after_a_redis_restart_workers_reconnect_and_every_tracking_resumes(
    restartable: tuple[PersistentRedis, Settings], tracker_app: Any, sandbox: SandboxServer
) -> None:
    """Redis SIGKILLed and restarted under a worker: it keeps consuming, nothing is lost.

    Celery drops the countdown tasks it held when the connection broke; the re-driver
    resumes them from the due index that AOF kept, and a task sent after the restart runs.
    """
    server, settings = restartable
    tracker_app.reconfigure(settings)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    label = uuid.uuid4().hex[:8]
    with worker_process(settings, concurrency=2, pool="prefork"):
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        before = [
            sandbox.state.create_scripted([("processing", 0), ("delivered", 6.0 + i)])
            for i in range(5)
        ]
        for mid in before:
            track_message.delay(mid, deadline=60, on_delivered=record_outcome.s(label=label))
        wait_for(lambda: all(sandbox.state.truth(m)["polls"] >= 1 for m in before), timeout=30)
        time.sleep(1.5)  # AOF fsyncs every second: what a restart keeps
        server.kill()
        time.sleep(2.0)
        server.start()
        restarted_at = time.time()
        tracker_app.close_engine()
        after = sandbox.state.create_scripted([("delivered", 0)])
        track_message.delay(after, deadline=60, on_delivered=record_outcome.s(label=label))
        entries = wait_for(
            lambda: len(recorded(client, label)) >= 6 and recorded(client, label),
            timeout=_bound(settings) + 30,
        )
    by_id = {e["result"]["message_id"]: e for e in entries}
    assert set(by_id) == {*before, after}
    assert len(entries) == 6  # one callback each
    assert all(e["result"]["outcome"] == "delivered" for e in entries)
    assert max(e["recorded_at"] for e in entries) - restarted_at <= _bound(settings) + 6
    client.close()


def test_a_campaign_survives_a_worker_kill_and_a_redis_restart(
    restartable: tuple[PersistentRedis, Settings], tracker_app: Any, sandbox: SandboxServer
) -> None:
    """A campaign through a whole-worker SIGKILL and a Redis restart: one report, all right."""
    server, settings = restartable
    tracker_app.reconfigure(settings)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    ids = [
        sandbox.state.create_scripted([("processing", 0), ("delivered", 2.0 + i % 6)])
        for i in range(20)
    ]
    with worker_process(settings, concurrency=2, pool="prefork") as first:
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        track_campaign.delay(
            "durable", ids, deadline=30, on_report=record_outcome.s(label="report")
        )
        wait_for(lambda: sum(sandbox.state.truth(m)["polls"] for m in ids) >= 5, timeout=30)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    time.sleep(1.5)
    server.kill()
    server.start()
    tracker_app.close_engine()
    with worker_process(settings, concurrency=2, pool="prefork"):
        [entry] = wait_for(lambda: recorded(client, "report"), timeout=30 + _bound(settings) + 30)
        time.sleep(2.0)  # a second report would arrive now
    assert len(recorded(client, "report")) == 1
    report = entry["result"]
    assert report["outcomes"]["delivered"] == 20
    assert report == get_campaign_report("durable")
    client.close()
