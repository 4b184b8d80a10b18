"""engine.run.run_check: one run of a tracking, with no Celery app, on the test Redis and
the sandbox API (the task around it only adds what Celery knows)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.run import RunRequest, run_check
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.tools.sandbox import SandboxServer


@pytest.fixture
def engine(make_settings: Callable[..., Settings]) -> Iterator[Engine]:
    """An engine with no Celery app, on its own key prefix."""
    settings = make_settings(key_prefix=f"run{uuid.uuid4().hex[:8]}")
    client: redis.Redis = redis_client(settings, decode_responses=True)
    api = SmsbatClient.from_settings(settings)
    yield Engine(settings, client, api, app=None)
    api.close()
    client.close()


def _request(engine: Engine, message_id: str, owner: str, run: int = 0, **times: Any) -> RunRequest:
    now = time.time()
    started_at = times.get("started_at", now)
    return RunRequest(
        message_id,
        owner=owner,
        run=run,
        started_at=started_at,
        deadline_at=started_at + engine.settings.deadline,
        due_at=now,
        now=now,
    )


def _register(engine: Engine, message_id: str, owner: str) -> None:
    now = time.time()
    engine.register(
        message_id,
        Subscription(),
        owner=owner,
        started_at=now,
        deadline_at=now + engine.settings.deadline,
        first_at=now,
    )


def test_a_final_status_ends_the_run_with_its_result(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """A run that finds the message delivered returns the result; no app is needed."""
    mid = sandbox.state.create_scripted([("delivered", 0)])
    _register(engine, mid, "owner-1")
    outcome = run_check(engine, _request(engine, mid, "owner-1"))
    assert outcome.wait is None
    assert outcome.result is not None
    assert outcome.result["outcome"] == "delivered"
    assert outcome.result["source"] == "poll"
    assert outcome.result["retries"] == {}  # found final at its first run
    assert engine.outcome(mid) is not None


def test_an_in_flight_status_asks_for_a_next_run_with_its_reason(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """A message still processing gives a wait and the reason Flower shows."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 600)])
    _register(engine, mid, "owner-2")
    outcome = run_check(engine, _request(engine, mid, "owner-2"))
    assert outcome.result is None
    assert outcome.wait is not None
    assert outcome.wait > 0
    assert outcome.reason.startswith("processing; next check in")


def test_a_second_first_run_joins_and_a_stale_run_is_superseded(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """The session's owner runs; another first run joins it; a stale retry stops."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 600)])
    _register(engine, mid, "owner-3")
    joined = run_check(engine, _request(engine, mid, "someone-else"))
    assert joined.result == {"message_id": mid, "outcome": "joined", "owner": "owner-3"}
    stale = run_check(engine, _request(engine, mid, "someone-else", run=4))
    assert stale.result == {"message_id": mid, "outcome": "superseded", "owner": "owner-3"}


def test_a_timeout_has_no_source_even_when_the_last_check_asked_the_api(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """A message still processing at its deadline times out; the check at the deadline
    asked the API, yet the result's source is None (no final status came from anywhere),
    as the README and the outcome metric's ``none`` say."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 600)])
    started = time.time() - engine.settings.deadline
    engine.register(
        mid,
        Subscription(),
        owner="owner-4",
        started_at=started,
        deadline_at=started + engine.settings.deadline,
        first_at=started,
    )
    outcome = run_check(engine, _request(engine, mid, "owner-4", started_at=started))
    assert outcome.result is not None
    assert outcome.result["outcome"] == "timeout"
    assert outcome.result["deliverystatus"] == "processing"
    assert outcome.result["polls"] == 1
    assert outcome.result["source"] is None


def test_a_tracking_counts_as_started_once_whatever_reruns_its_first_run(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """``smsbat_trackings_started_total`` counts a tracking once: not again for a copy of
    its first run given back after a crash (same task id), nor for the fresh first run of a
    re-drive (a new owner)."""
    from smsbat_tracker import metrics
    from smsbat_tracker.store.redrive_scripts import Take, TakeSession

    registry = metrics.get().registry

    def started() -> float:
        return registry.get_sample_value("smsbat_trackings_started_total") or 0.0

    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 600)])
    _register(engine, mid, "owner-5")
    before = started()
    assert run_check(engine, _request(engine, mid, "owner-5")).wait is not None
    assert started() == before + 1
    # The session expects run 1 now; a copy of run 0 given back is stale and stops.
    run_check(engine, _request(engine, mid, "owner-5"))
    keys = engine.keys
    taken = TakeSession(engine.redis)(
        keys.due(), keys.session(mid), f"m:{mid}", time.time() + 60, "owner-6", time.time()
    )
    assert taken.result == Take.TAKEN
    assert run_check(engine, _request(engine, mid, "owner-6")).wait is not None
    assert started() == before + 1


def test_a_tracking_a_push_ended_before_its_first_run_counts_as_started(
    engine: Engine, sandbox: SandboxServer
) -> None:
    """A push can end a tracking before its first run (the receiver records the outcome
    and counts it): the first run still counts the tracking as started, so started and
    outcomes agree across the worker's and the receiver's metrics."""
    from smsbat_tracker import metrics
    from smsbat_tracker.engine.run import settle_from_cache
    from smsbat_tracker.provider.models import MessageStatus

    registry = metrics.get().registry

    def started() -> float:
        return registry.get_sample_value("smsbat_trackings_started_total") or 0.0

    mid = sandbox.state.create_scripted([("delivered", 0)])
    _register(engine, mid, "owner-7")
    engine.cache.store(
        mid, MessageStatus.model_validate({"deliverystatus": "delivered"}), source="push"
    )
    assert settle_from_cache(engine, mid, claimer="receiver") is not None
    before = started()
    outcome = run_check(engine, _request(engine, mid, "owner-7"))
    assert outcome.result is not None
    assert outcome.result["outcome"] == "delivered"
    assert started() == before + 1
    assert sandbox.state.truth(mid)["polls"] == 0
