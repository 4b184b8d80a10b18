"""Campaigns end to end: batch ticks, one outcome per message, the report, the rate limit."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
import redis

from smsbat_tracker.celery.campaigns import get_campaign_report, track_campaign
from smsbat_tracker.celery.track import get_status
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.errors import InvalidMessageId
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import RateLimiter
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import recorded, wait_for

MIX = [
    ("delivered", 0.3),
    ("delivered", 1.2),
    ("undeliverable", 0.5),
    ("permanenterror", 0.8),
    ("delivered", 2.0),
]


def make_messages(sandbox: SandboxServer, n: int, *, never_final: int = 0) -> dict[str, str]:
    """n scripted messages cycling through MIX (plus some that never finish): id -> truth."""
    truth = {}
    for i in range(n):
        final, at = MIX[i % len(MIX)]
        extended = {"fallback": True} if i % 7 == 0 and final == "delivered" else None
        mid = sandbox.state.create_scripted(
            [("scheduled", 0), ("processing", at / 2), (final, at)], cost=0.05, extended=extended
        )
        truth[mid] = final
    for _ in range(never_final):
        truth[sandbox.state.create_scripted([("processing", 0)])] = "timeout"
    return truth


def register_due(runner: Any, campaign_id: str, ids: list[str]) -> None:
    """Register a campaign of ``ids`` sent 30 s ago (every first check is due), with no
    callbacks, straight through the runner (no worker ticks it)."""
    runner.register(
        campaign_id,
        ids,
        deadline=60,
        subscription=Subscription(),
        on_report=None,
        enqueued_at=time.time() - 30,
    )


def test_campaign_reports_every_outcome_once(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Every message ends with its true outcome, once; the report adds them up."""
    truth = make_messages(sandbox, 40, never_final=3)
    track_campaign.delay(
        "spring-sale",
        list(truth),
        deadline=5,
        on_report=record_outcome.s(label="report"),
        on_delivered=record_outcome.s(label="msg"),
        on_failed=record_outcome.s(label="msg"),
        on_timeout=record_outcome.s(label="msg"),
    )
    [entry] = wait_for(lambda: recorded(redis_client, "report"), timeout=20)
    report = entry["result"]
    wait_for(lambda: len(recorded(redis_client, "msg")) >= len(truth), timeout=10)
    per_message = [e["result"] for e in recorded(redis_client, "msg")]
    assert len(per_message) == len(truth)
    assert {r["message_id"]: r["outcome"] for r in per_message} == truth
    expected = {
        k: list(truth.values()).count(k)
        for k in ("delivered", "undeliverable", "permanenterror", "timeout", "error")
    }
    assert report["outcomes"] == expected
    assert report["total"] == len(truth)
    assert report["finished"] is True
    assert report["delivery_rate"] == pytest.approx(expected["delivered"] / len(truth), abs=1e-4)
    # Basic bodies carry no currency; extended ones (the Viber fallbacks here) say USD.
    assert set(report["cost"]) == {"USD", "unknown"}
    assert report["cost"]["unknown"] > 0
    assert report["fallback"]["used"] >= 1
    assert report["time_to_final_p50"] is not None
    assert get_campaign_report("spring-sale") == report
    # Every message was checked at least once and never twice within a second.
    for mid in truth:
        times = sorted(sandbox.state.truth(mid)["poll_times"])
        assert all(b - a >= 0.98 for a, b in itertools.pairwise(times))


def test_campaign_started_twice_runs_once(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A second track_campaign with the same id is refused; one report."""
    truth = make_messages(sandbox, 5)
    for _ in range(2):
        track_campaign.delay(
            "dup", list(truth), deadline=5, on_report=record_outcome.s(label="report")
        )
    wait_for(lambda: recorded(redis_client, "report"), timeout=20)
    wait_for(lambda: redis_client.llen("celery") == 0, timeout=10)
    assert len(recorded(redis_client, "report")) == 1


def test_cached_final_status_needs_no_request(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis, tracker_app: Any
) -> None:
    """A message already known final (cache) is settled by the campaign without a request."""
    done = sandbox.state.create_scripted([("delivered", 0)])
    get_status(done)
    assert sandbox.state.truth(done)["polls"] == 1
    track_campaign.delay("cached", [done], deadline=5, on_report=record_outcome.s(label="r"))
    [entry] = wait_for(lambda: recorded(redis_client, "r"), timeout=15)
    assert entry["result"]["outcomes"]["delivered"] == 1
    assert sandbox.state.truth(done)["polls"] == 1


def test_campaign_ids_are_checked_at_enqueue(tracker_app: Any) -> None:
    """Bad campaign or message ids never reach the broker."""
    with pytest.raises(InvalidMessageId, match="campaign id"):
        track_campaign.delay("../x", ["abc"])
    with pytest.raises(InvalidMessageId):
        track_campaign.delay("ok", ["abc", "a/b"])
    with pytest.raises(ValueError, match="non-empty"):
        track_campaign.delay("ok", [])
    assert tracker_app.engine.redis.llen("celery") == 0


def test_report_is_json_serialisable_while_running(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A running campaign has a partial report with pending messages."""
    truth = make_messages(sandbox, 3, never_final=2)
    track_campaign.delay("partial", list(truth), deadline=30)
    wait_for(lambda: get_campaign_report("partial") is not None, timeout=10)
    report = get_campaign_report("partial")
    assert report is not None
    assert report["finished"] is False
    json.dumps(report)


def test_batch_without_a_turn_at_the_rate_limit_goes_back_in_line(
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch the rate limit cannot serve yet makes no request and holds no worker: its
    messages are due again as before, and the tick comes back when the turn comes."""
    runner = tracker_app.campaigns
    ids = list(make_messages(sandbox, 3))
    register_due(runner, "turn", ids)
    due_key = Keys().campaign_due("turn")
    before = dict(redis_client.zrange(due_key, 0, -1, withscores=True))
    slot, run = next(iter(runner.chains("turn").items()))
    limiter = RateLimiter(redis_client, tracker_app.settings, rate=50)
    monkeypatch.setattr(tracker_app.engine, "limiter", limiter)
    limiter.pause(4.0)  # no token for anyone for 4 s
    result = runner.tick("turn", slot, run)
    assert (result.claimed, result.api_calls, result.recorded) == (3, 0, 0)
    assert result.next_in is not None
    # Back when the turn comes (the pause's end), or at the longest wait if sooner.
    assert min(3.0, tracker_app.settings.max_delay) <= result.next_in <= 4.0
    assert dict(redis_client.zrange(due_key, 0, -1, withscores=True)) == before
    assert all(sandbox.state.truth(m)["polls"] == 0 for m in ids)


def test_a_message_once_pushed_stays_pushed_when_its_cache_entry_expires(
    tracker_app: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A campaign message that has had a push is trusted to be pushed for the rest of its
    tracking, as track_message keeps it in its session: once the pushed status's cache
    entry expires (30 s), the campaign still does not poll it before its deadline."""
    runner = tracker_app.campaigns
    mid = sandbox.state.create_scripted([("processing", 0)])
    runner.register(
        "pushed",
        [mid],
        deadline=60,
        subscription=Subscription(),
        on_report=None,
        enqueued_at=time.time() - 5,
    )
    tracker_app.engine.cache.store(
        mid, MessageStatus.model_validate({"deliverystatus": "processing"}), source="push"
    )
    slot, run = next(iter(runner.chains("pushed").items()))
    due_key = Keys().campaign_due("pushed")
    deadline_at = float(runner.meta("pushed")["deadline_at"])
    first = runner.tick("pushed", slot, run)
    assert (first.claimed, first.api_calls) == (1, 0)  # the push is trusted: no request
    redis_client.delete(Keys().status(mid))  # the cache entry expires
    redis_client.zadd(due_key, {mid: time.time()})  # and the message falls due again
    again = runner.tick("pushed", slot, run)
    assert (again.claimed, again.api_calls, again.recorded) == (1, 0, 0)
    assert sandbox.state.truth(mid)["polls"] == 0
    # Looked at again only at the deadline (or in push_wait steps), as a pushed message.
    push_wait = tracker_app.engine.rules.push_wait
    assert redis_client.zscore(due_key, mid) >= min(deadline_at, time.time() + push_wait) - 1


def test_campaign_outcomes_are_right_while_the_api_fails(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """Campaigns follow the same rules: failed requests (5xx, 429, malformed, a slow answer
    past the read timeout) are retried, and no delivered message comes out as a timeout,
    even when its deadline check fails."""
    tracker_app.reconfigure(make_settings(read_timeout=0.5, deadline_grace=6.0))
    truth = make_messages(sandbox, 10)
    faults = ["500", "429", "malformed", "slow", "500"]
    sandbox.state.set_faults(
        retry_after=1, slow_seconds=1.0, message_faults=dict.fromkeys(truth, faults)
    )
    track_campaign.delay(
        "flaky",
        list(truth),
        deadline=3,
        on_delivered=record_outcome.s(label="msg"),
        on_failed=record_outcome.s(label="msg"),
        on_timeout=record_outcome.s(label="msg"),
    )
    results = wait_for(
        lambda: len(recorded(redis_client, "msg")) >= len(truth) and recorded(redis_client, "msg"),
        timeout=30,
    )
    assert {e["result"]["message_id"]: e["result"]["outcome"] for e in results} == truth
    assert all(sandbox.state.truth(m)["polls"] >= len(faults) + 1 for m in truth)


def test_a_tick_chain_is_one_task_in_flower(
    worker: Any, tracker_app: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A campaign's ticks run again as retries of their chain's task: the task list shows
    one task per chain (SMSBAT_CAMPAIGN_TICKS), not one per tick."""
    from celery.signals import task_prerun

    runs: list[str] = []

    def note(sender: Any = None, task_id: Any = None, **_: Any) -> None:
        if getattr(sender, "name", "") == "smsbat_tracker.campaign_tick":
            runs.append(str(task_id))

    task_prerun.connect(note, weak=False)
    try:
        truth = make_messages(sandbox, 10)
        track_campaign.delay(
            "one-task-a-chain", list(truth), deadline=4, on_report=record_outcome.s(label="r")
        )
        wait_for(lambda: recorded(redis_client, "r"), timeout=20)
    finally:
        task_prerun.disconnect(note)
    assert len(runs) > tracker_app.settings.campaign_ticks  # it ticked more than once a chain
    assert len(set(runs)) <= tracker_app.settings.campaign_ticks


@pytest.mark.parametrize(("rate_limit", "polled"), [(50.0, 10), (0.0, 40)])
def test_a_tick_under_a_rate_limit_hands_its_process_back_after_one_batch(
    tracker_app: Any,
    make_settings: Any,
    sandbox: SandboxServer,
    rate_limit: float,
    polled: int,
) -> None:
    """Under a rate limit a tick run checks one batch and hands its worker process back
    (its next run comes at once, behind the checks and callbacks waiting for a process):
    a batch's requests go at the limit's pace, and a tick that worked through batch after
    batch slept that pace out on the process while the worker's other tasks waited
    seconds. Without a limit it works through every due batch within its budget."""
    from smsbat_tracker.celery.campaigns import campaign_tick
    from smsbat_tracker.celery.task_base import NextRun

    tracker_app.reconfigure(make_settings(campaign_batch=10, rate_limit=rate_limit))
    runner = tracker_app.campaigns
    ids = list(make_messages(sandbox, 40))
    register_due(runner, "one-batch", ids)
    slot, run = next(iter(runner.chains("one-batch").items()))
    with pytest.raises(NextRun):  # called directly, Celery raises the retry's reason
        campaign_tick("one-batch", slot=slot, run=run)
    assert sum(sandbox.state.truth(m)["polls"] for m in ids) == polled
