"""track_message end to end: a real worker, a real Redis, the sandbox API over HTTP."""

from __future__ import annotations

import itertools
import time
import traceback
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from smsbat_tracker.celery.track import get_status, settle_message, track_message
from smsbat_tracker.errors import InvalidMessageId
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import NO_ANSWER
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import kept, recorded, wait_for


def scripted(sandbox: SandboxServer, *steps: tuple[str, float], **kw: Any) -> str:
    return sandbox.state.create_scripted(list(steps), **kw)


def callbacks(label: str = "default") -> dict[str, Any]:
    sig = record_outcome.s(label=label)
    return {"on_delivered": sig, "on_failed": sig, "on_timeout": sig}


def outcomes(client: redis.Redis, label: str = "default") -> list[dict[str, Any]]:
    return [entry["result"] for entry in recorded(client, label)]


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        ("delivered", "delivered"),
        ("undeliverable", "undeliverable"),
        ("permanenterror", "permanenterror"),
    ],
)
def test_each_final_status_fires_its_outcome_once(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis, final: str, expected: str
) -> None:
    """A message moving scheduled -> processing -> final fires one callback with that outcome."""
    mid = scripted(sandbox, ("scheduled", 0), ("processing", 0.3), (final, 0.9), cost=0.07)
    track_message.delay(mid, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["message_id"] == mid
    assert result["outcome"] == expected
    assert result["deliverystatus"] == final
    assert result["polls"] >= 1
    assert result["started_at"] < result["finished_at"]
    assert result["status"]["deliverystatus"] == final
    if final == "delivered":
        assert result["cost"] == pytest.approx(0.07)
    time.sleep(0.5)  # nothing more may arrive
    assert len(outcomes(redis_client)) == 1


def test_the_right_callback_is_chosen(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """on_delivered for delivered, on_failed for failures; the others are not called."""
    ok = scripted(sandbox, ("processing", 0), ("delivered", 0.2))
    bad = scripted(sandbox, ("processing", 0), ("undeliverable", 0.2))
    for mid in (ok, bad):
        track_message.delay(
            mid,
            on_delivered=record_outcome.s(label="delivered"),
            on_failed=record_outcome.s(label="failed"),
            on_timeout=record_outcome.s(label="timeout"),
        )
    wait_for(lambda: outcomes(redis_client, "delivered") and outcomes(redis_client, "failed"))
    assert [r["message_id"] for r in outcomes(redis_client, "delivered")] == [ok]
    assert [r["message_id"] for r in outcomes(redis_client, "failed")] == [bad]
    assert outcomes(redis_client, "timeout") == []


def test_deadline_fires_timeout_close_to_it(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A message that never becomes final times out at the deadline, not much after."""
    mid = scripted(sandbox, ("scheduled", 0), ("processing", 0.2))
    sent_at = time.time()
    track_message.delay(mid, deadline=3, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=10)
    assert result["outcome"] == "timeout"
    assert result["deliverystatus"] == "processing"
    finished = recorded(redis_client)[0]["recorded_at"]
    assert 3 <= finished - sent_at < 5
    truth = sandbox.state.truth(mid)
    # never past the deadline: every request happened before it (plus scheduling slack)
    assert max(truth["poll_times"]) <= sent_at + 3 + 1.0


def test_never_two_requests_within_one_second(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Even with a tiny backoff and three trackers, requests for one id are >= 1 s apart."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 4.5))
    for label in ("a", "b", "c"):
        track_message.delay(mid, on_delivered=record_outcome.s(label=label))
    wait_for(lambda: all(outcomes(redis_client, x) for x in "abc"), timeout=15)
    times = sorted(sandbox.state.truth(mid)["poll_times"])
    assert len(times) >= 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.98


def test_duplicate_enqueue_fires_once(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """The same tracking enqueued three times is one subscription: one callback."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 0.8))
    with capture_logs() as logs:
        tasks = [
            track_message.apply_async((mid,), callbacks(), ignore_result=False) for _ in range(3)
        ]
    assert [e["event"] for e in logs if e["event"] == "track.duplicate"] == ["track.duplicate"] * 2
    wait_for(lambda: all(t.ready() for t in tasks) and outcomes(redis_client), timeout=15)
    # Every task sent so far (callbacks too) has run and been acknowledged (acks_late).
    wait_for(lambda: redis_client.llen("celery") + redis_client.hlen("unacked") == 0)
    assert len(outcomes(redis_client)) == 1
    assert sorted(t.result["outcome"] for t in tasks) == ["delivered", "joined", "joined"]


def test_second_tracker_joins_and_its_callbacks_fire(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Two calls with different callbacks share one poller; each callback fires once."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 1.5))
    track_message.delay(mid, on_delivered=record_outcome.s(label="first"))
    track_message.delay(mid, on_delivered=record_outcome.s(label="second"))
    wait_for(lambda: outcomes(redis_client, "first") and outcomes(redis_client, "second"))
    first, second = outcomes(redis_client, "first"), outcomes(redis_client, "second")
    assert len(first) == len(second) == 1
    assert first[0]["polls"] == second[0]["polls"]  # the very same outcome record


def test_tracking_an_already_final_message_needs_no_request(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis, tracker_app: Any
) -> None:
    """A cached final status (earlier check or push) ends a new tracking with 0 polls."""
    mid = scripted(sandbox, ("delivered", 0))
    assert get_status(mid).deliverystatus == "delivered"  # one API call, cached as final
    track_message.delay(mid, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client))
    assert result["outcome"] == "delivered"
    assert result["polls"] == 0
    assert sandbox.state.truth(mid)["polls"] == 1


def test_get_status_reads_through_the_cache(tracker_app: Any, sandbox: SandboxServer) -> None:
    """Two get_status calls within the cache TTL make one API call."""
    mid = scripted(sandbox, ("processing", 0))
    assert get_status(mid).deliverystatus == "processing"
    assert get_status(mid).deliverystatus == "processing"
    assert sandbox.state.truth(mid)["polls"] == 1


def test_bad_credentials_end_with_error(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A 401 is permanent: the outcome is error, delivered to on_failed, no more polls."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 5))
    sandbox.state.set_faults(message_faults={mid: ["401"]})
    track_message.delay(
        mid,
        on_delivered=record_outcome.s(label="delivered"),
        on_failed=record_outcome.s(label="failed"),
    )
    [result] = wait_for(lambda: outcomes(redis_client, "failed"))
    assert result["outcome"] == "error"
    assert "401" in result["error"]
    assert sandbox.state.truth(mid)["polls"] == 1


def test_unknown_message_errors_after_grace(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A 404 is retried during the grace period (2 s here), then ends with error."""
    track_message.delay("neverexisted123", **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["outcome"] == "error"
    assert result["polls"] >= 2


def test_transient_errors_are_retried(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """5xx, 429 and malformed answers do not end tracking; the next checks succeed."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 0.5))
    sandbox.state.set_faults(message_faults={mid: ["500", "429", "malformed"]}, retry_after=1)
    track_message.delay(mid, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["outcome"] == "delivered"
    assert sandbox.state.truth(mid)["polls"] == 4


def test_a_failed_request_does_not_spend_the_schedule(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """After a failed request the next one comes a second later, not after the schedule's
    next wait (4.5 s here); the schedule goes on from the next answer."""
    tracker_app.reconfigure(make_settings(first_delay=3.0, max_delay=5.0))
    mid = scripted(sandbox, ("processing", 0), ("delivered", 8.0))
    sandbox.state.set_faults(message_faults={mid: ["ok", "500", "500", "500"]})
    track_message.delay(mid, deadline=20, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=25)
    assert result["outcome"] == "delivered"
    times = sandbox.state.truth(mid)["poll_times"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 4, gaps
    assert gaps[0] >= 4.0  # after an answer: the schedule
    assert all(0.9 <= g <= 1.6 for g in gaps[1:]), gaps  # after a failure: 1 s


def test_the_deadline_check_is_retried_until_it_has_an_answer(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """A message delivered before its deadline whose deadline check keeps failing is still
    reported delivered: the check is retried within SMSBAT_DEADLINE_GRACE, not turned into
    a timeout (which would re-send an OTP)."""
    tracker_app.reconfigure(make_settings(first_delay=1.5, max_delay=2.0, deadline_grace=6.0))
    mid = scripted(sandbox, ("processing", 0), ("delivered", 1.8))
    # The first check (1.5 s) answers "processing"; then every request fails until 4.
    sandbox.state.set_faults(message_faults={mid: ["ok", "500", "429", "malformed", "500"]})
    track_message.delay(mid, deadline=2, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=20)
    assert result["outcome"] == "delivered"
    assert result["error"] is None
    times = sandbox.state.truth(mid)["poll_times"]
    assert times[-1] - times[0] > 2.0  # it answered past the deadline, within the grace


def test_no_answer_by_the_end_of_the_grace_says_so(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """When every request fails through the deadline's grace, the outcome is timeout and
    its error says no answer came."""
    tracker_app.reconfigure(make_settings(deadline_grace=1.5))
    mid = scripted(sandbox, ("processing", 0))
    sandbox.state.set_faults(message_faults={mid: ["500"] * 50})
    track_message.delay(mid, deadline=1.5, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=20)
    assert result["outcome"] == "timeout"
    assert result["error"] == NO_ANSWER
    assert result["deliverystatus"] is None  # no answer ever came


def test_unknown_status_is_logged_once_and_not_final(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A status the product does not know is kept, logged once, and polling goes on."""
    mid = scripted(sandbox, ("queued_at_carrier", 0), ("delivered", 3.0))
    with capture_logs() as logs:
        track_message.delay(mid, **callbacks())
        [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["outcome"] == "delivered"
    unknown = [e for e in logs if e["event"] == "track.unknown_status"]
    assert len(unknown) == 1
    assert unknown[0]["deliverystatus"] == "queued_at_carrier"
    assert sandbox.state.truth(mid)["polls"] >= 2


def test_chain_gets_the_result(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """track_message.s(id) | next.s() passes the final result dict, once."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 0.5))
    (track_message.s(mid) | record_outcome.s(label="chain")).delay()
    [result] = wait_for(lambda: outcomes(redis_client, "chain"))
    assert result["outcome"] == "delivered"
    assert result["message_id"] == mid


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "a b", "x" * 200])
def test_hostile_ids_are_refused_at_enqueue(tracker_app: Any, bad: str) -> None:
    """A hostile id never reaches the broker."""
    with pytest.raises(InvalidMessageId):
        track_message.delay(bad)
    assert tracker_app.engine.redis.llen("celery") == 0


def test_rate_limited_tracking_stays_within_limit_and_deadline(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """With a 2 requests/s global limit, 6 trackers share it; their deadline checks, all
    due at once, each get an answer within the deadline's grace, and none polls past it."""
    tracker_app.reconfigure(make_settings(rate_limit=2.0, deadline_grace=5.0))
    mids = [scripted(sandbox, ("processing", 0)) for _ in range(6)]
    sent_at = time.time()
    for mid in mids:
        track_message.delay(mid, deadline=3, **callbacks())
    results = wait_for(lambda: len(outcomes(redis_client)) == 6 and outcomes(redis_client), 15)
    assert {r["outcome"] for r in results} == {"timeout"}
    assert {r["error"] for r in results} == {None}  # each had its answer at the deadline
    times = sorted(t for mid in mids for t in sandbox.state.truth(mid)["poll_times"])
    assert times, "some checks happened"
    assert max(times) <= sent_at + 3 + 5 + 0.5  # none after the grace (plus scheduling slack)
    # At most 2/s on average over the run, give or take one request of scheduling jitter.
    assert len(times) <= 2 * (times[-1] - times[0]) + 2


def test_settle_message_ends_tracking_from_a_status_stored_elsewhere(
    worker: Any, tracker_app: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """``settle_message``, for code that stores statuses itself, fires the callback once."""
    mid = sandbox.state.create_scripted([("processing", 0)])
    sig = record_outcome.s(label="settled")
    track_message.delay(mid, deadline=30, on_delivered=sig, on_timeout=sig)
    engine = tracker_app.engine
    wait_for(lambda: engine.session(mid) is not None)  # the first check has run
    status = MessageStatus.model_validate({"messageId": mid, "deliverystatus": "delivered"})
    assert engine.cache.store(mid, status, source="push")
    settle_message.delay(mid)
    settle_message.delay(mid)  # a duplicate settles nothing more
    [entry] = wait_for(lambda: recorded(redis_client, "settled"))
    assert entry["result"]["outcome"] == "delivered"
    # Every task sent so far has run and been acknowledged (acks_late).
    wait_for(lambda: redis_client.llen("celery") + redis_client.hlen("unacked") == 0)
    assert len(recorded(redis_client, "settled")) == 1


def test_pushes_untrusted_keep_the_polling_schedule(
    make_settings: Any,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """With ``SMSBAT_TRUST_PUSHES=false`` a message with pushes is still polled on schedule."""
    tracker_app.reconfigure(make_settings(trust_pushes=False))
    mid = sandbox.state.create_scripted([("processing", 0)])
    status = MessageStatus.model_validate({"messageId": mid, "deliverystatus": "processing"})
    assert tracker_app.engine.cache.store(mid, status, source="push")
    track_message.delay(mid, deadline=4, **callbacks())
    wait_for(lambda: sandbox.state.truth(mid)["polls"] >= 1, timeout=10)
    assert tracker_app.engine.session(mid).pushed is False  # polling, not awaiting pushes
    [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["outcome"] == "timeout"
    assert sandbox.state.truth(mid)["polls"] >= 2  # not just the check at the deadline


def test_sent_by_name_the_first_run_registers_the_callbacks(
    worker: Any, tracker_app: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """``send_task`` skips the enqueue's registration; the first run does it instead."""
    mid = scripted(sandbox, ("processing", 0), ("delivered", 0.3))
    tracker_app.send_task("smsbat_tracker.track_message", args=[mid], kwargs=callbacks())
    [result] = wait_for(lambda: outcomes(redis_client))
    assert result["outcome"] == "delivered"


def test_an_enqueue_that_fails_to_publish_leaves_nothing_registered(
    tracker_app: Any, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker refuses the task, its session and callbacks are undone."""
    from celery import Task
    from kombu.exceptions import OperationalError

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise OperationalError("broker down")

    monkeypatch.setattr(Task, "apply_async", refuse)
    mid = scripted(sandbox, ("processing", 0))
    with pytest.raises(OperationalError):
        track_message.delay(mid, **callbacks())
    engine = tracker_app.engine
    assert engine.session(mid) is None
    assert engine.redis.hlen(engine.keys.subs(mid)) == 0


def test_a_retry_leaves_the_task_with_a_one_frame_traceback() -> None:
    """A check's retry carries only TrackTask.__call__'s frame: Celery copies it per retry."""
    from celery import Celery
    from celery.exceptions import Retry

    from smsbat_tracker.celery.track import TrackTask

    app = Celery("retry-traceback", set_as_current=False)

    @app.task(base=TrackTask, bind=True, name="tests.retries_at_once")
    def retries(self: Any) -> None:
        raise Retry("next check", when=1.0)

    with pytest.raises(Retry) as caught:
        retries()
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "retries" not in frames
    assert frames[-1] == "__call__"


def test_flower_shows_why_a_check_runs_again_and_the_outcome_first(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Each retry carries its reason (what Flower and the worker log show instead of a bare
    ``Retry(Retry(...), None, 8.0)``), and the result starts with the outcome."""
    from celery.signals import task_retry

    reasons: list[str] = []

    def note(sender: Any = None, reason: Any = None, **_: Any) -> None:
        reasons.append(repr(reason))

    task_retry.connect(note, weak=False)
    try:
        mid = scripted(sandbox, ("processing", 0), ("delivered", 1.5))
        sandbox.state.set_faults(message_faults={mid: ["ok", "500"]})
        track_message.delay(mid, **callbacks())
        [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    finally:
        task_retry.disconnect(note)
    assert any("NextRun('processing; next check in" in r for r in reasons), reasons
    assert any("NextRun('the request failed; retry in 1.0 s')" in r for r in reasons), reasons
    assert next(iter(result)) == "outcome"


def test_a_finished_tracking_keeps_only_its_outcome(
    tracker_app: Any, worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Once the outcome is recorded and its callback sent, the session, subscriptions,
    claims and the cached status with its history are dropped: one key is left, the
    outcome, naming the subscription it served; get_status answers from it, no request."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 0.5)])
    track_message.delay(mid, deadline=10, **callbacks())
    [result] = wait_for(lambda: outcomes(redis_client), timeout=15)
    assert result["outcome"] == "delivered"
    _, served = wait_for(lambda: (k := kept(redis_client, mid))[0] == {"outcome"} and k)
    assert len(served) == 1
    assert redis_client.zscore("smsbat:due", f"m:{mid}") is None
    polls = sandbox.state.truth(mid)["polls"]
    assert get_status(mid).deliverystatus == "delivered"
    assert sandbox.state.truth(mid)["polls"] == polls
    assert tracker_app.engine.outcome(mid)["status"]["messageId"] == mid


def test_a_served_subscription_is_not_served_again_after_the_tracking_is_cut_back(
    tracker_app: Any, worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """A redelivered task sent by name registers its callbacks again in its first run:
    once served, they fire nothing more, though the subscriptions themselves were dropped.
    A new subscription after the end still gets the outcome, at once."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 0.5)])
    kwargs = {"deadline": 10, **{k: dict(v) for k, v in callbacks("once").items()}}
    tracker_app.send_task("smsbat_tracker.track_message", (mid,), kwargs)
    wait_for(lambda: outcomes(redis_client, "once"), timeout=15)
    wait_for(lambda: kept(redis_client, mid)[0] == {"outcome"})
    tracker_app.send_task("smsbat_tracker.track_message", (mid,), kwargs)  # the redelivery
    wait_for(lambda: redis_client.zcard("smsbat:due") == 0 and redis_client.llen("celery") == 0)
    late_at = time.time()
    track_message.delay(mid, deadline=10, **callbacks("late"))
    [entry] = wait_for(lambda: recorded(redis_client, "late"), timeout=10)
    assert entry["result"]["outcome"] == "delivered"
    assert entry["recorded_at"] - late_at < 2.0  # not after the first delay
    assert len(outcomes(redis_client, "once")) == 1
    assert wait_for(lambda: kept(redis_client, mid)[0] == {"outcome"})
    assert len(kept(redis_client, mid)[1]) == 2
