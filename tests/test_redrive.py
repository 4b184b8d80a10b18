"""The due index and the re-driver, against a real Redis and the real engine."""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.app.task import Context
from celery.canvas import Signature
from kombu.exceptions import OperationalError
from structlog.testing import capture_logs

from smsbat_tracker.celery.compat import kombu_qos
from smsbat_tracker.celery.names import DUE_AT, PUBLISHED_AT, TRACK_TASK
from smsbat_tracker.celery.redrive import LOCK_MS, RESEND_LIMIT, SWEEP_LIMIT, Redriver
from smsbat_tracker.celery.redrive.bounds import (
    GONE_AFTER,
    HANDED_AFTER,
    HELD_CHUNK,
    ORPHAN_AFTER,
    RAN_FOR,
    RELEASE_CHUNK,
)
from smsbat_tracker.celery.redrive.giveback import due_time
from smsbat_tracker.celery.redrive.held import connection_name
from smsbat_tracker.celery.track import _due_at, track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.session import Subscription, build_result
from smsbat_tracker.rules.decide import Finish
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import ReleaseBatch
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import kept, recorded

TRACK_LIST = "celery\x06\x166"


def _register(tracker_app: Any, message_id: str, *, due_in: float, owner: str = "t-1") -> None:
    now = time.time()
    tracker_app.engine.register(
        message_id,
        Subscription(on_delivered=dict(record_outcome.s(label="rd"))),
        owner=owner,
        started_at=now,
        deadline_at=now + 60,
        first_at=now + due_in,
    )


def _score(client: redis.Redis, member: str) -> float | None:
    return client.zscore(Keys().due(), member)


def test_registration_puts_the_first_check_in_the_due_index(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A new tracking is due at its first check, written by the registering script."""
    before = time.time()
    _register(tracker_app, "rd-first", due_in=5.0)
    score = _score(redis_client, "m:rd-first")
    assert score is not None
    assert before + 5.0 <= score <= time.time() + 5.0


def test_an_overdue_tracking_is_taken_over_and_run_afresh(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """Overdue past SMSBAT_REDRIVE_AFTER: a new owner, run 0, and its task in the queue,
    with the arguments the first had and the lost run's due time in its DUE_AT header (its
    place in the rate limit's line), not as an ETA (due now, it counts against the
    fetching worker's prefetch limit); the lost run gets a task-succeeded event saying it was
    superseded by the new one (Flower would show it STARTED or RETRY for good)."""
    due_at = time.time() - 20.0
    _register(tracker_app, "rd-lost", due_in=-20.0)
    redriver = Redriver(tracker_app, redis_client)
    events = redis_client.pubsub()
    events.psubscribe("*celeryev*")
    assert events.get_message(timeout=2)["type"] == "psubscribe"  # type: ignore[index]
    assert redriver.sweep() == 1
    session = tracker_app.engine.session("rd-lost")
    assert session is not None
    assert session.owner != "t-1"
    assert session.run == 0
    [raw] = redis_client.lrange(TRACK_LIST, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"] == session.owner
    assert message["headers"]["task"] == "smsbat_tracker.track_message"
    assert message["headers"]["argsrepr"] == "('rd-lost',)"
    sent: list[dict[str, Any]] = []  # task-sent (the new run's publish), then the lost run's end
    while not [e for e in sent if e["type"] == "task-succeeded"]:
        event = events.get_message(timeout=5)
        assert event is not None, sent
        sent.append(json.loads(base64.b64decode(json.loads(event["data"])["body"])))
    [body] = [e for e in sent if e["type"] == "task-succeeded"]
    assert body["uuid"] == "t-1"
    assert body["result"] == repr(
        {"outcome": "superseded", "message_id": "rd-lost", "owner": session.owner}
    )
    events.close()
    assert message["headers"]["eta"] is None
    assert message["headers"][DUE_AT] == pytest.approx(due_at, abs=1)
    assert _score(redis_client, "m:rd-lost") == pytest.approx(time.time(), abs=2)
    assert redriver.sweep() == 0  # taken over once; due again only after the bound


def test_a_run_takes_its_place_in_the_line_from_its_eta_or_its_due_at_header() -> None:
    """A run's due time (its place in the rate limit's line) is its ETA; a run given back
    or re-driven without one reads the DUE_AT header Celery puts on its request; neither
    (or a header that is no time, or one to come) means now."""
    now = time.time()
    eta = datetime.fromtimestamp(now - 5, tz=UTC)
    assert _due_at(Context({"eta": eta.isoformat()}), now) == pytest.approx(now - 5)
    assert _due_at(Context({"eta": eta}), now) == pytest.approx(now - 5)
    assert _due_at(Context({"eta": None, DUE_AT: now - 7}), now) == now - 7
    assert _due_at(Context({"eta": None, DUE_AT: now + 7}), now) == now
    assert _due_at(Context({"eta": None, DUE_AT: "soon"}), now) == now
    assert _due_at(Context({"eta": None}), now) == now


def test_a_tracking_late_by_less_than_the_bound_is_left_alone(
    tracker_app: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    """An entry overdue by less than SMSBAT_REDRIVE_AFTER may still be on its way."""
    _register(tracker_app, "rd-late", due_in=-(settings.redrive_after - 3))
    assert Redriver(tracker_app, redis_client).sweep() == 0
    assert tracker_app.engine.session("rd-late").owner == "t-1"


def test_a_backlog_in_the_queue_holds_the_sweep_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """An overdue tracking younger than the oldest waiting task may be queued behind it."""
    _register(tracker_app, "rd-queued", due_in=-20.0)
    waiting = {"headers": {PUBLISHED_AT: time.time() - 30, "id": "x"}, "body": ""}
    redis_client.lpush(TRACK_LIST, json.dumps(waiting))
    redriver = Redriver(tracker_app, redis_client)
    assert redriver.lost_runs.queue_age(time.time()) == pytest.approx(30, abs=1)
    assert redriver.sweep() == 0
    redis_client.delete(TRACK_LIST)  # the workers drained the backlog: it was lost
    assert redriver.sweep() == 1


def test_one_worker_sweeps_at_a_time(tracker_app: Any, redis_client: redis.Redis) -> None:
    """While another worker holds the sweep lock, this one re-drives nothing."""
    _register(tracker_app, "rd-locked", due_in=-20.0)
    redis_client.set(Keys().redrive_lock(), "someone-else", px=LOCK_MS)
    redriver = Redriver(tracker_app, redis_client)
    assert redriver.sweep() == 0
    redis_client.delete(Keys().redrive_lock())
    assert redriver.sweep() == 1
    assert redis_client.get(Keys().redrive_lock()) is None  # released after the sweep


def test_a_held_request_keeps_its_entry_alive(tracker_app: Any, redis_client: redis.Redis) -> None:
    """A request this worker holds (due, waiting for the pool, or running) is refreshed."""
    _register(tracker_app, "rd-held", due_in=-20.0, owner="t-held")
    _register(tracker_app, "rd-stale", due_in=-20.0, owner="t-now")

    def request(message_id: str, task_id: str, retries: int) -> SimpleNamespace:
        return SimpleNamespace(
            name="smsbat_tracker.track_message",
            id=task_id,
            args=[message_id],
            kwargs={},
            request_dict={"retries": retries},
        )

    redriver = Redriver(tracker_app, redis_client)
    held = [request("rd-held", "t-held", 0), request("rd-stale", "t-old", 0)]
    assert redriver.refresher.refresh(held) == 1  # the stale copy's token does not match
    assert _score(redis_client, "m:rd-held") == pytest.approx(time.time(), abs=2)
    assert redriver.sweep() == 1  # only the tracking nobody holds
    assert tracker_app.engine.session("rd-held").owner == "t-held"


def test_a_superseded_run_stops_without_a_request_or_a_callback(
    tracker_app: Any, redis_client: redis.Redis, sandbox: SandboxServer
) -> None:
    """The lost task, back after the takeover, finds its token moved and does nothing."""
    mid = sandbox.state.create_scripted([("delivered", 0)])
    _register(tracker_app, mid, due_in=-20.0, owner="t-lost")
    assert Redriver(tracker_app, redis_client).sweep() == 1
    result = track_message.apply(
        kwargs={"message_id": mid, "enqueued_at": time.time() - 30, "deadline": 60},
        task_id="t-lost",
        retries=3,
    ).get()
    assert result["outcome"] == "superseded"
    assert sandbox.state.truth(mid)["polls"] == 0
    assert not recorded(redis_client, "rd")


def test_a_stale_copy_of_the_owners_own_run_stops(
    tracker_app: Any, redis_client: redis.Redis, sandbox: SandboxServer
) -> None:
    """A run the session no longer expects (requeued after its retry went out) stops."""
    mid = sandbox.state.create_scripted([("delivered", 0)])
    _register(tracker_app, mid, due_in=0.0, owner="t-own")
    engine = tracker_app.engine
    assert engine.reschedule(mid, owner="t-own", run=0, next_at=time.time() + 5, counted=True)
    assert not engine.reschedule(mid, owner="t-own", run=0, next_at=time.time(), counted=True)
    result = track_message.apply(
        kwargs={"message_id": mid, "enqueued_at": time.time(), "deadline": 60},
        task_id="t-own",
        retries=0,
    ).get()
    assert result["outcome"] == "superseded"
    assert sandbox.state.truth(mid)["polls"] == 0


def test_settling_keeps_the_entry_until_every_callback_is_sent(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatch that fails gives its claims back at once; the next settle sends them."""
    _register(tracker_app, "rd-settle", due_in=30.0)
    engine = tracker_app.engine
    result = build_result("rd-settle", "delivered")
    original = Signature.apply_async

    def refuse(self: Signature, *args: Any, **kwargs: Any) -> Any:
        raise OperationalError("broker unreachable")

    monkeypatch.setattr(Signature, "apply_async", refuse)
    with pytest.raises(OperationalError):
        engine.settle("rd-settle", result, claimer="webhook-1")
    assert redis_client.hgetall(Keys().claims("rd-settle")) == {}  # claim given back
    assert _score(redis_client, "m:rd-settle") == pytest.approx(time.time(), abs=2)

    monkeypatch.setattr(Signature, "apply_async", original)
    retried = engine.settle("rd-settle", None, claimer="webhook-2")  # the provider's retry
    assert len(retried.claimed) == 1
    [(sub_id, _)] = retried.claimed
    # Nothing left to do: out of the due index, and only the outcome kept, naming the
    # subscription it served.
    assert _score(redis_client, "m:rd-settle") is None
    assert kept(redis_client, "rd-settle") == ({"outcome"}, {sub_id})


def test_a_claim_of_a_dead_claimer_is_taken_after_the_bound(
    tracker_app: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    """A claimer that died between its claim and its send is replaced after the bound."""
    _register(tracker_app, "rd-dead", due_in=30.0)
    engine = tracker_app.engine
    result = build_result("rd-dead", "delivered")
    sub_id = next(iter(redis_client.hkeys(Keys().subs("rd-dead"))))
    # What a claimer leaves when it dies after claiming: a pending mark, the entry due.
    engine.redis.set(Keys().outcome("rd-dead"), json.dumps(result))
    old = int((time.time() - settings.redrive_after - 1) * 1000)
    redis_client.hset(Keys().claims("rd-dead"), sub_id, f"pending:webhook-dead:{old}")
    settled = engine.settle("rd-dead", None, claimer="redriven-run")
    assert [s for s, _ in settled.claimed] == [sub_id]
    assert kept(redis_client, "rd-dead") == ({"outcome"}, {sub_id})  # sent, then cut back


def test_a_lost_tick_chain_is_taken_over_with_its_batch(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A re-driven chain gets a new run, and the batch the lost tick claimed is due now."""
    runner = tracker_app.campaigns
    ids = [f"rd-c{i}" for i in range(4)]
    assert runner.register(
        "rd-camp",
        ids,
        deadline=60,
        subscription=Subscription(),
        on_report=None,
        enqueued_at=time.time(),
    )
    keys = Keys()
    # The lost tick had claimed two messages (leased a minute ahead) and died.
    fell_due = {"rd-c0": time.time() - 9, "rd-c1": time.time() - 8}
    redis_client.zadd(
        keys.campaign_due("rd-camp"), {"rd-c0": time.time() + 60, "rd-c1": time.time() + 60}
    )
    redis_client.zadd(keys.campaign_claimed("rd-camp", 0), fell_due)
    redis_client.zadd(keys.due(), {"c:rd-camp:0": time.time() - 20})
    before = runner.chains("rd-camp")[0]
    assert Redriver(tracker_app, redis_client).sweep() == 1
    after = runner.chains("rd-camp")[0]
    assert after != before
    assert after.endswith(":0")
    for mid in ("rd-c0", "rd-c1"):  # due again, in their places in the line
        assert redis_client.zscore(keys.campaign_due("rd-camp"), mid) == pytest.approx(
            fell_due[mid]
        )
    [raw] = redis_client.lrange(TRACK_LIST, 0, -1)
    assert json.loads(raw)["headers"]["task"] == "smsbat_tracker.campaign_tick"
    assert not runner.holds("rd-camp", 0, before)  # the lost chain's ticks stop


def test_a_finished_sessions_stale_entry_is_dropped(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """An entry whose session is gone is removed, not re-driven."""
    redis_client.zadd(Keys().due(), {"m:rd-gone": time.time() - 60, "x:junk": time.time() - 60})
    assert Redriver(tracker_app, redis_client).sweep() == 0
    assert redis_client.zcard(Keys().due()) == 0


def test_what_a_dead_worker_held_goes_back_to_the_queue(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A task held by a worker that stopped beating is restored at once, by kombu itself.

    Held by a live worker, or by a worker that never reported it, it stays where it is; a
    worker that stopped without giving back what it held is swept like a dead one.
    """
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 2},))
    # A consumer's channel holds what it fetched (closing it would give everything back).
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    held = [channel.basic_get("celery", no_ack=False) for _ in range(2)]
    tags = [str(message.delivery_tag) for message in held]
    assert redis_client.hlen("unacked") == 2
    assert redis_client.llen("celery") == 0
    dead, alive = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    now = time.time()
    dead.held.note_held([SimpleNamespace(message=held[0])], now - 30)  # stopped beating 30 s ago
    alive.held.note_held([SimpleNamespace(message=held[1])], now)
    assert alive.dead.restore(now) == 1
    assert redis_client.llen("celery") == 1
    assert redis_client.hkeys("unacked") == [tags[1]]  # the live worker's task stays held
    assert redis_client.zrange(Keys().holders(), 0, -1) == [alive.holder]
    # A stop that could not give its task back (Redis away at close): left to the sweep.
    alive.held.retire(now)
    assert redis_client.zrange(Keys().holders(), 0, -1) == [alive.holder]
    assert alive.dead.restore(now + 60) == 1
    assert redis_client.hlen("unacked") == 0
    # A stop that gave everything back leaves nothing, its handed set included.
    redis_client.sadd(Keys().held_handed(alive.holder), "handed-before-the-stop")
    alive.held.retire(now + 60)
    assert redis_client.zcard(Keys().holders()) == 0
    assert not redis_client.exists(Keys().held(alive.holder))
    assert not redis_client.exists(Keys().held_handed(alive.holder))
    connection.release()


def _named_redriver(tracker_app: Any, redis_url: str) -> tuple[Redriver, redis.Redis]:
    """A re-driver whose client's connections carry its name, as the bootstep makes it."""
    holder = uuid.uuid4().hex
    client = redis.Redis.from_url(
        redis_url, decode_responses=True, client_name=connection_name(holder)
    )
    return Redriver(tracker_app, client, holder), client


def _beat_ago(client: redis.Redis, holder: str, seconds: float) -> None:
    """Move a holder's last beat ``seconds`` back, on both clocks (no sleeping)."""
    keys = Keys()
    for key in (keys.beats(), keys.holders()):
        client.zincrby(key, -seconds, holder)


def _connected(client: redis.Redis, holder: str) -> bool:
    names = {c.get("name") for c in client.client_list(_type="normal")}
    return connection_name(holder) in names


def test_a_worker_whose_connections_closed_is_gone_before_the_bound(
    tracker_app: Any, redis_client: redis.Redis, redis_url: str
) -> None:
    """A worker whose process died (its kernel closed its sockets: a SIGKILL) is gone once
    it missed GONE_AFTER of beats on the server's clock, long before SMSBAT_REDRIVE_AFTER:
    what it held goes back then. A worker with a connection open (frozen, or only slow to
    beat) waits for the bound, and so does one whose last beat came before the sweeping
    worker's last outage, or whose connections carry no name."""
    for x in (1, 2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": x},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    held = [channel.basic_get("celery", no_ack=False) for _ in range(2)]
    dying, dying_client = _named_redriver(tracker_app, redis_url)
    frozen, frozen_client = _named_redriver(tracker_app, redis_url)
    unnamed = Redriver(tracker_app, redis_client)
    sweeper, sweeper_client = _named_redriver(tracker_app, redis_url)
    now = time.time()
    dying.held.note_held([SimpleNamespace(message=held[0])], now)
    frozen.held.note_held([SimpleNamespace(message=held[1])], now)
    unnamed.held.note_held([], now)
    sweeper.held.note_held([], now)
    assert dying.held.named
    assert not unnamed.held.named
    assert sweeper.dead.restore(time.time()) == 0  # every beat is fresh
    dying_client.close()  # its process died
    deadline = time.monotonic() + 10
    while _connected(redis_client, dying.holder):
        assert time.monotonic() < deadline, "the server never saw the connection close"
        time.sleep(0.01)
    for redriver in (dying, frozen):
        _beat_ago(redis_client, redriver.holder, GONE_AFTER - 0.5)
    assert sweeper.dead.find_gone(time.time(), 0.0) == []  # not quiet for long enough yet
    for redriver in (dying, frozen):
        _beat_ago(redis_client, redriver.holder, 0.6)
    redis_client.zadd(Keys().holders(), {unnamed.holder: time.time() - GONE_AFTER - 0.1})
    served = sweeper.held.beaten.served  # type: ignore[union-attr]
    assert sweeper.dead.find_gone(time.time(), served + 5) == []  # beat before an outage
    with capture_logs() as logs:
        assert sweeper.dead.restore(time.time(), served - 60) == 1
    assert [e["holders"] for e in logs if e["event"] == "redrive.gone"] == [[dying.holder]]
    assert redis_client.hkeys("unacked") == [str(held[1].delivery_tag)]
    assert redis_client.llen("celery") == 1
    live = set(redis_client.zrange(Keys().holders(), 0, -1))
    assert live == {frozen.holder, unnamed.holder, sweeper.holder}
    assert redis_client.zrange(Keys().beats(), 0, -1) == sorted(
        [frozen.holder, sweeper.holder], key=lambda h: redis_client.zscore(Keys().beats(), h)
    )
    held[1].ack()
    for client in (frozen_client, sweeper_client):
        client.close()
    connection.release()


def test_a_dead_workers_large_held_set_goes_back_in_one_sweep(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A busy worker's held set names a few seconds' worth of tasks it had finished: one
    sweep looks through HELD_LOOKS chunks of it, so that its unacknowledged tasks go back
    at once rather than a chunk a second."""
    for x in (1, 2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": x},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    held = [channel.basic_get("celery", no_ack=False) for _ in range(2)]
    dead, sweeper = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    now = time.time()
    finished = [
        SimpleNamespace(message=SimpleNamespace(delivery_tag=f"done-{i}"))
        for i in range(3 * HELD_CHUNK)
    ]
    dead.held.note_held([*finished, *(SimpleNamespace(message=m) for m in held)], now - 30)
    assert sweeper.dead.restore(now) == 2
    assert redis_client.llen("celery") == 2
    assert not redis_client.exists(Keys().held(dead.holder))
    assert redis_client.zscore(Keys().holders(), dead.holder) is None
    connection.release()


def test_a_dead_workers_tasks_go_back_so_that_the_most_overdue_are_fetched_first(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """What a dead worker held goes back latest due first: kombu pops from the right, so
    the task with no due time (a callback) is fetched first, then the runs due longest
    ago, and the runs due later last, whatever order the held set listed them in."""
    now = time.time()
    etas = {"late": now + 30, "early": now - 20, "middle": now - 5}
    for name, at in etas.items():
        tracker_app.send_task(
            "smsbat_tracker.recipes.record_outcome",
            args=({"x": name},),
            eta=datetime.fromtimestamp(at, tz=UTC),
        )
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": "callback"},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    held = [channel.basic_get("celery", no_ack=False) for _ in range(4)]
    dead, sweeper = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    dead.held.note_held([SimpleNamespace(message=m) for m in reversed(held)], now - 30)
    assert sweeper.dead.restore(now) == 4
    queued = [json.loads(raw) for raw in redis_client.lrange("celery", 0, -1)]
    fetched_next_first = [
        json.loads(base64.b64decode(m["body"]))[0][0]["x"] for m in reversed(queued)
    ]
    assert fetched_next_first == ["callback", "early", "middle", "late"]
    connection.release()


def test_a_dead_workers_overdue_runs_go_back_due_now_with_their_due_time_in_a_header(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A tracker run whose ETA passed goes back without it, its due time in the DUE_AT
    header: the worker that fetches it counts it against its prefetch limit, instead of
    taking every overdue run a dead worker held at once and fetching nothing else until
    its pool has worked through them. A run not yet due keeps its ETA (held until then),
    and so does a user's task, overdue or not; the give back's order reads either."""
    now = time.time()
    sent = {
        "overdue-run": (TRACK_TASK, now - 20),
        "later-run": (TRACK_TASK, now + 30),
        "overdue-callback": ("smsbat_tracker.recipes.record_outcome", now - 10),
    }
    for name, (task, at) in sent.items():
        tracker_app.send_task(
            task, args=(name,), eta=datetime.fromtimestamp(at, tz=UTC), queue="celery"
        )
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    held = [channel.basic_get("celery", no_ack=False) for _ in range(3)]
    dead, sweeper = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    dead.held.note_held([SimpleNamespace(message=m) for m in held], now - 30)
    assert sweeper.dead.restore(now) == 3
    queued = [
        json.loads(raw) for key in ("celery", TRACK_LIST) for raw in redis_client.lrange(key, 0, -1)
    ]
    headers = {json.loads(base64.b64decode(m["body"]))[0][0]: m["headers"] for m in queued}
    assert headers["overdue-run"]["eta"] is None
    assert headers["overdue-run"][DUE_AT] == pytest.approx(now - 20, abs=0.01)
    assert datetime.fromisoformat(headers["later-run"]["eta"]).timestamp() == pytest.approx(
        now + 30, abs=0.01
    )
    assert DUE_AT not in headers["later-run"]
    assert datetime.fromisoformat(headers["overdue-callback"]["eta"]).timestamp() == (
        pytest.approx(now - 10, abs=0.01)
    )
    assert DUE_AT not in headers["overdue-callback"]
    # Given back again (its next worker died too), it goes back in its due order.
    entry = json.dumps([queued[0] | {"headers": headers["overdue-run"]}, "", "celery"])
    assert due_time(entry) == pytest.approx(now - 20, abs=0.01)
    connection.release()


@pytest.mark.parametrize("then", ["gone", "quiet"])
def test_what_a_frozen_worker_handed_to_its_pool_waits_for_it(
    tracker_app: Any, redis_client: redis.Redis, then: str
) -> None:
    """A worker that stops beating but is not gone (frozen: its connections stay open) gets
    back only what it had not handed to its pool: a task past Celery's ``revoked()`` check
    runs when the worker wakes up, and a copy given back would run too. Once the worker
    is found gone, or has been quiet for HANDED_AFTER, that one goes back as well."""
    for x in ("waiting", "handed"):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": x},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    waiting, handed = (channel.basic_get("celery", no_ack=False) for _ in range(2))
    frozen, sweeper = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    now = time.time()
    name = "smsbat_tracker.recipes.record_outcome"
    requests = [
        SimpleNamespace(message=waiting, name=name),
        SimpleNamespace(message=handed, name=name, _apply_result=object()),
    ]
    frozen.held.note_held(requests, now - 10)
    keys = Keys()
    assert redis_client.smembers(keys.held_handed(frozen.holder)) == {str(handed.delivery_tag)}
    assert sweeper.dead.restore(now) == 1
    [back] = redis_client.lrange("celery", 0, -1)
    assert json.loads(back)["headers"]["id"] == waiting.headers["id"]
    assert redis_client.zscore(keys.holders(), frozen.holder) is not None  # still waited for
    if then == "gone":
        redis_client.zadd(keys.holders(), {frozen.holder: 0})
        assert sweeper.dead.restore(now) == 1
    else:
        assert sweeper.dead.restore(now - 10 + HANDED_AFTER + 1) == 1
    assert redis_client.llen("celery") == 2
    assert redis_client.zscore(keys.holders(), frozen.holder) is None
    assert not redis_client.exists(keys.held_handed(frozen.holder))
    connection.release()


def test_the_handed_set_holds_what_the_fence_let_through_until_it_is_done(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A follow-up the fence lets through is noted as handed with the next flush; a
    tracking run (its session fences it) is not. The beat writes the set anew from what
    the worker holds: a task done since leaves it."""
    redriver = Redriver(tracker_app, redis_client)
    key = Keys().held_handed(redriver.holder)
    callback = SimpleNamespace(
        name="smsbat_tracker.recipes.record_outcome",
        id="cb-1",
        message=SimpleNamespace(delivery_tag="tag-cb", headers={}),
    )
    run = SimpleNamespace(
        name="smsbat_tracker.track_message",
        id="run-1",
        message=SimpleNamespace(delivery_tag="tag-run", headers={}),
    )
    assert redriver.fence.superseded(callback) is False
    assert redriver.fence.superseded(run) is False
    redriver.held.flush_received()
    assert redis_client.smembers(key) == {"tag-cb"}
    redriver.held.note_held([], time.time())  # the callback ran and was acknowledged
    assert not redis_client.exists(key)


def test_due_time_reads_the_eta_header_and_anything_else_is_due_at_once() -> None:
    """An unacked entry's due time is its ``eta`` header, else its DUE_AT header; neither,
    or an entry that cannot be read, is due at once (-inf): given back last, fetched
    first."""
    entry = [{"headers": {"eta": "2026-12-04T06:00:00+00:00"}}, "", "celery"]
    assert due_time(json.dumps(entry)) == datetime(2026, 12, 4, 6, tzinfo=UTC).timestamp()
    assert due_time(json.dumps([{"headers": {"eta": None}}, "", "celery"])) == -math.inf
    assert due_time(b"not json") == -math.inf
    assert due_time(json.dumps({"headers": {}})) == -math.inf
    assert due_time(json.dumps([{"headers": {"eta": None, DUE_AT: 1.5}}, "", "c"])) == 1.5


def test_the_redrivers_connections_carry_its_name_unless_the_server_refuses(
    make_settings: Any, redis_client: redis.Redis, redis_url: str
) -> None:
    """The bootstep's client names its connections after the worker (what the others look
    for in CLIENT LIST); a user whose ACL refuses CLIENT SETNAME gets an unnamed client
    that works (logged), rather than a re-driver that cannot connect."""
    from smsbat_tracker.celery.redrive.step import RedriveStep

    named = RedriveStep._make_client(make_settings(), "smsbat-redriver-x1")
    assert named.client_getname() == "smsbat-redriver-x1"
    named.close()
    redis_client.acl_setuser(
        "nosetname",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-client|setname"],
    )
    try:
        host = redis_url.split("//", 1)[1]
        with capture_logs() as logs:
            client = RedriveStep._make_client(
                make_settings(redis_url=f"redis://nosetname:pw@{host}"), "smsbat-redriver-x2"
            )
        assert client.ping()
        assert client.client_getname() is None
        assert [e["event"] for e in logs] == ["redrive.unnamed"]
        client.close()
    finally:
        redis_client.acl_deluser("nosetname")


def test_a_live_worker_found_gone_looks_up_what_it_holds_at_its_next_beat(
    tracker_app: Any, redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker found gone though alive (its connection cut, and no beat for GONE_AFTER):
    its next beat finds its holders score 0 and has the fence look up everything it holds
    (the others may have given it back); a beat that finds its score as it left it does
    not."""
    worker, client = _named_redriver(tracker_app, redis_url)
    monkeypatch.setattr(Redriver, "redis_uptime", lambda self: 60.0)
    found: list[bool] = []
    confirmed = worker.fence.beat_confirmed

    def spy(started: Any, tags: Any, *, found_dead: bool = False) -> int:
        found.append(found_dead)
        return confirmed(started, tags, found_dead=found_dead)

    monkeypatch.setattr(worker.fence, "beat_confirmed", spy)
    worker.run_once()  # a start: nothing to find
    worker.run_once()
    redis_client.zadd(Keys().holders(), {worker.holder: 0})  # what Gone writes
    worker.run_once()
    worker.run_once()
    assert found == [False, False, True, False]
    client.close()


def test_tracker_runs_received_are_noted_in_one_command_at_the_next_flush(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A tracker run a worker fetched is noted in its held set by the next flush (every
    NOTE_EVERY, many runs in one command), not by a round trip of its own; what the flush
    could not write, the next beat does."""
    redriver = Redriver(tracker_app, redis_client)
    key = Keys().held(redriver.holder)
    runs = [
        SimpleNamespace(id=f"run-{i}", message=SimpleNamespace(delivery_tag=f"t{i}"))
        for i in range(3)
    ]
    for run in runs:
        redriver.held.note_received(run, at_once=False)
    assert not redis_client.exists(key)
    assert redriver.held.flush_received() == 3
    assert redis_client.smembers(key) == {"t0", "t1", "t2"}
    assert redriver.held.flush_received() == 0
    late = SimpleNamespace(id="run-late", message=SimpleNamespace(delivery_tag="t-late"))
    redriver.held.note_received(late, at_once=False)
    redriver.held.note_held([], time.time())  # the beat notes what was received meanwhile
    assert "t-late" in redis_client.smembers(key)


def test_campaign_callbacks_a_dead_tick_left_are_sent_once_each(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick killed while sending callbacks: the next one sends only what was not sent."""
    runner = tracker_app.campaigns
    ids = ["rd-u0", "rd-u1", "rd-u2"]
    sub = Subscription(on_delivered=dict(record_outcome.s(label="u")))
    assert runner.register(
        "rd-unsent", ids, deadline=60, subscription=sub, on_report=None, enqueued_at=time.time()
    )
    sent: list[str] = []

    def publish(self: Signature, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        if len(sent) == 1:
            raise SystemExit("killed")  # dies while sending the second callback
        sent.append(args[0]["message_id"])

    monkeypatch.setattr(Signature, "apply_async", publish)
    meta = runner.meta("rd-unsent")
    with pytest.raises(SystemExit):
        runner._recorder.record(
            "rd-unsent", meta, dict.fromkeys(ids, Finish("delivered")), time.time()
        )
    unsent = Keys().campaign_unsent("rd-unsent")
    assert sorted(redis_client.hkeys(unsent)) == ["rd-u1", "rd-u2"]
    assert runner.resend_unsent("rd-unsent", meta) == 0  # not stale yet: its tick may live
    old = int((time.time() - 10) * 1000)
    for m in ("rd-u1", "rd-u2"):
        redis_client.hset(unsent, m, old)
    sent.append("-")  # the next sends succeed
    assert runner.resend_unsent("rd-unsent", meta) == 2
    assert sent == ["rd-u0", "-", "rd-u1", "rd-u2"]
    assert redis_client.hlen(unsent) == 0


def test_after_an_outage_the_sweep_waits_for_the_others_to_beat_again(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starting up sweeps at once; one back from an outage waits OUTAGE_GRACE.

    So does every worker while Redis itself has been up for less than that.
    """
    uptime = [0.5]
    monkeypatch.setattr(Redriver, "redis_uptime", lambda self: uptime[0])
    just_restarted = Redriver(tracker_app, redis_client)
    _register(tracker_app, "rd-restart", due_in=-20.0)
    just_restarted.run_once()
    assert tracker_app.engine.session("rd-restart").owner == "t-1"
    uptime[0] = 60.0
    _register(tracker_app, "rd-outage", due_in=-20.0)
    back = Redriver(tracker_app, redis_client)
    back._fresh = False  # it had beaten before: this beat follows an outage
    back.run_once()
    assert tracker_app.engine.session("rd-outage").owner == "t-1"  # not yet
    back.beating_since = time.time() - 5  # beaten for long enough since
    back.run_once()
    assert tracker_app.engine.session("rd-outage").owner != "t-1"
    starting = Redriver(tracker_app, redis_client)
    _register(tracker_app, "rd-start", due_in=-20.0)
    starting.run_once()
    assert tracker_app.engine.session("rd-start").owner != "t-1"


def test_a_taken_over_tick_run_neither_claims_nor_forgets_the_new_runs_batch(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """The old run of a re-driven chain, still running, leaves the new run's batch alone."""
    runner = tracker_app.campaigns
    now = time.time()
    assert runner.register(
        "rd-two",
        ["rd-t0", "rd-t1"],
        deadline=60,
        subscription=Subscription(),
        on_report=None,
        enqueued_at=now,
    )
    redis_client.zadd(Keys().campaign_due("rd-two"), {"rd-t0": now, "rd-t1": now})
    keys = Keys()
    old = runner.chains("rd-two")[0]
    redis_client.zadd(keys.due(), {"c:rd-two:0": now - 20})
    assert Redriver(tracker_app, redis_client).sweep() == 1
    new = runner.chains("rd-two")[0]
    claimed = keys.campaign_claimed("rd-two", 0)
    redis_client.zadd(claimed, {"rd-t1": now})  # the new run's batch, in flight
    result = runner.tick("rd-two", 0, old)
    assert result.claimed == 0
    assert redis_client.zrange(claimed, 0, -1) == ["rd-t1"]
    assert runner.tick("rd-two", 0, new).claimed == 2  # its own batch back first, then due


def test_a_task_this_worker_dropped_goes_back_to_the_queue(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A task a live worker stopped holding while still unacked (a lost connection) is given
    back at its next beat, and counted as restored; one it acknowledged is not."""
    from smsbat_tracker import metrics

    registry = metrics.get().registry

    def restored() -> float:
        return registry.get_sample_value("smsbat_redrives_total", {"kind": "restored"}) or 0.0

    before = restored()
    for n in range(2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": n},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    dropped, done = (channel.basic_get("celery", no_ack=False) for _ in range(2))
    redriver = Redriver(tracker_app, redis_client)
    now = time.time()
    assert (
        redriver.held.note_held(
            [SimpleNamespace(message=dropped), SimpleNamespace(message=done)], now
        )
        == 0
    )
    done.ack()
    assert redriver.held.note_held([], now + 1) == 0  # a beat later: an ack may be on its way
    # Still noted as held meanwhile: were this worker to die now, its sweep finds it.
    assert str(dropped.delivery_tag) in redis_client.smembers(Keys().held(redriver.holder))
    assert redriver.held.note_held([], now + 2) == 1  # only the unacked one
    assert restored() == before + 1
    assert redis_client.llen("celery") == 1
    assert redis_client.hlen("unacked") == 0
    assert redis_client.smembers(Keys().held(redriver.holder)) == set()
    connection.release()


def test_a_task_dropped_in_an_outage_right_after_its_receipt_goes_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A task received just before Redis went away (noted at receipt, at no beat) and dropped
    by the consumer with the connection is given back once beats reach Redis again, however
    long the outage lasted (a master failover: seen losing four callbacks)."""
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    dropped = connection.default_channel.basic_get("celery", no_ack=False)
    redriver = Redriver(tracker_app, redis_client)
    redriver.held.note_received(SimpleNamespace(id="dropped-id", message=dropped))
    # The outage: every beat failed while the receipt grew old.
    redriver.held._received[str(dropped.delivery_tag)] -= 10.0
    now = time.time()
    assert redriver.held.note_held([], now) == 0  # the first beat back: no longer held
    assert redriver.held.note_held([], now + 1) == 1  # still unacked a beat later: given back
    assert redis_client.llen("celery") == 1
    assert redis_client.hlen("unacked") == 0
    connection.release()


def test_what_the_consumer_dropped_in_an_outage_goes_back_at_the_first_beat_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A countdown the consumer held when Redis went away was dropped with the connection:
    the first beat that reaches Redis again gives it back at once (acknowledgements made
    in the outage were made first), not a beat later as in normal times."""
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    dropped = connection.default_channel.basic_get("celery", no_ack=False)
    redriver = Redriver(tracker_app, redis_client)
    request = SimpleNamespace(id="dropped-id", message=dropped)
    now = time.time()
    assert redriver.held.note_held([request], now) == 0
    redriver.held._beat_failed = True  # the next beats failed: Redis was away
    assert redriver.held.note_held([], now + 5) == 1  # the first beat back
    assert redis_client.llen("celery") == 1
    assert redis_client.hlen("unacked") == 0
    connection.release()


def test_a_task_received_in_an_outage_is_named_for_the_others_at_the_first_beat_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A task received while Redis was away (its note at receipt failed) and dropped with
    the connection is named in the held set at the first beat back, before this worker gives
    it back: should the worker die in between, the others' sweep gives it back within
    SMSBAT_REDRIVE_AFTER, not the orphan sweep ORPHAN_AFTER later (a Redis restart, then a
    worker SIGKILL 4 s later: a callback 33 s late in a crash run)."""
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    dropped = connection.default_channel.basic_get("celery", no_ack=False)
    tag = str(dropped.delivery_tag)
    dying = Redriver(tracker_app, redis_client)
    dying.held._received[tag] = time.monotonic() - 10.0  # noted locally; Redis was away
    assert not redis_client.exists(Keys().held(dying.holder))
    now = time.time()
    assert dying.held.note_held([], now) == 0  # the first beat back; then SIGKILL
    assert redis_client.sismember(Keys().held(dying.holder), tag)
    sweeper = Redriver(tracker_app, redis_client)
    assert sweeper.dead.restore(now + 10) == 1
    assert redis_client.llen("celery") == 1
    assert redis_client.hlen("unacked") == 0
    connection.release()


def test_a_task_this_worker_ran_whose_ack_was_lost_is_acknowledged_again_not_run_again(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A callback the pool took (Celery acknowledges it then) whose acknowledgement never
    reached Redis (the master died with it, or the channel a lost connection closed never
    made it) is still unacked when it is no longer held: it is acknowledged again, with the
    hook's marks, and not given back to run a second time (a failover test's callback ran
    twice this way, 1 run in 6). A task the pool never took is still given back."""
    for n in range(2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": n},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    ran_message, dropped_message = (channel.basic_get("celery", no_ack=False) for _ in range(2))
    ran = SimpleNamespace(id="ran-id", message=ran_message, time_start=None, acknowledged=False)
    dropped = SimpleNamespace(
        id="dropped-id", message=dropped_message, time_start=None, acknowledged=False
    )
    redriver = Redriver(tracker_app, redis_client)
    now = time.time()
    assert redriver.held.note_held([ran, dropped], now) == 0
    ran.time_start, ran.acknowledged = time.time(), True  # on_accepted; the ack went nowhere
    with capture_logs() as logs:
        assert redriver.held.note_held([], now + 1) == 0  # a beat later: an ack may be on its way
        assert redriver.held.note_held([], now + 2) == 1  # only the dropped one goes back
    assert redis_client.hlen("unacked") == 0
    assert redis_client.llen("celery") == 1
    [back] = [json.loads(m) for m in redis_client.lrange("celery", 0, -1)]
    assert back["headers"]["id"] != "ran-id"
    events = {e["event"]: e for e in logs}
    assert events["redrive.acked_again"]["task_ids"] == ["ran-id"]
    assert events["redrive.restored_dropped"]["task_ids"] == ["dropped-id"]
    connection.release()


def test_a_task_rejected_to_requeue_while_redis_was_away_is_given_back(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task the pool ran and Celery rejected to requeue (a child lost mid-run, with
    ``task_reject_on_worker_lost``) while Redis was away is left unacked to be given back:
    it is, though this worker ran it."""
    kombu_qos.install(redis_client)
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    message = channel.basic_get("celery", no_ack=False)
    request = SimpleNamespace(id="lost-id", message=message, time_start=None, acknowledged=False)
    redriver = Redriver(tracker_app, redis_client)
    now = time.time()
    redriver.held.note_held([request], now)

    def away(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to the old master")

    monkeypatch.setattr(channel.qos, "restore_by_tag", away)
    monkeypatch.setattr(channel.qos, "_remove_from_indices", away)
    channel.qos.reject(message.delivery_tag, requeue=True)
    request.time_start, request.acknowledged = time.time(), True
    monkeypatch.undo()
    assert redriver.held.note_held([], now + 1) == 0
    assert redriver.held.note_held([], now + 2) == 1
    assert redis_client.llen("celery") == 1
    assert redis_client.hlen("unacked") == 0
    connection.release()


def test_a_task_finished_while_redis_is_away_is_acknowledged_once_it_is_back(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that finishes while Redis is away (a Sentinel failover takes seconds) is
    acknowledged at the re-driver's first beat that reaches Redis, before anything is given
    back: it is not run again (seen as a callback run twice in the failover test)."""
    kombu_qos.install(redis_client)
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    finished = channel.basic_get("celery", no_ack=False)
    redriver = Redriver(tracker_app, redis_client)
    now = time.time()
    redriver.held.note_held([SimpleNamespace(message=finished)], now)

    def away(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to the old master")

    monkeypatch.setattr(channel.qos, "_remove_from_indices", away)
    finished.ack()  # neither raised nor logged as "Couldn't ack"
    assert redis_client.hlen("unacked") == 1
    monkeypatch.undo()  # Redis is back
    assert redriver.held.note_held([], now + 1) == 0
    assert redis_client.hlen("unacked") == 0
    assert redriver.held.note_held([], now + 2) == 0
    assert redis_client.llen("celery") == 0
    connection.release()


def test_a_callback_sent_again_after_a_crash_keeps_its_task_id(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent, then not marked sent (its sender died): the second send is the same task,
    so a callback can use ``self.request.id`` as its idempotency key."""
    _register(tracker_app, "rd-same", due_in=30.0)
    engine = tracker_app.engine
    published: list[str] = []

    def publish(self: Signature, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        published.append(kwargs["task_id"])

    monkeypatch.setattr(Signature, "apply_async", publish)
    mark = engine.dispatcher.mark_sent
    calls = []

    def mark_fails_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis went away after the send")
        return mark(*args, **kwargs)

    monkeypatch.setattr(engine.dispatcher, "mark_sent", mark_fails_once)
    result = build_result("rd-same", "delivered")
    with pytest.raises(redis.ConnectionError):
        engine.settle("rd-same", result, claimer="first")
    engine.settle("rd-same", None, claimer="second")
    assert len(published) == 2
    assert published[0] == published[1]
    other = build_result("rd-other", "delivered")
    _register(tracker_app, "rd-other", due_in=30.0)
    engine.settle("rd-other", other, claimer="third")
    assert published[2] != published[0]  # another message's callback is another task


def test_a_resend_skips_what_the_broker_still_holds(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A callback a stopped claimer may have sent is not sent again while the broker holds
    it, queued or unacknowledged (even by a dead worker: the re-driver gives it back);
    one the broker does not hold is sent."""
    engine = tracker_app.engine
    sig = record_outcome.s(label="again")
    engine.send_once([(sig, "held-id", {})], {"x": 1}, maybe_sent=False)
    assert redis_client.llen("celery") == 1
    connection = tracker_app.connection_for_write()
    held = connection.default_channel.basic_get("celery", no_ack=False)  # a worker holds it
    assert held is not None
    engine.send_once([(sig, "held-id", {}), (sig, "new-id", {})], {"x": 1}, maybe_sent=True)
    [queued] = redis_client.lrange("celery", 0, -1)
    assert json.loads(queued)["headers"]["id"] == "new-id"
    assert engine.in_broker(["held-id", "new-id", "gone-id"], [sig]) == {"held-id", "new-id"}
    connection.release()


def test_a_follow_up_lost_before_any_worker_received_it_is_sent_again(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A callback popped from the queue by a worker killed before it noted it (kombu's
    BRPOP window) is sent again, with the same task id; one a worker received, or that
    the broker still holds, is not; after RESEND_LIMIT sends it is given up."""
    engine = tracker_app.engine
    keys = Keys()
    now = time.time()
    redis_client.hset(keys.worker_queues(), "celery", repr(now))  # a tracker worker's queue
    engine.dispatcher.queues_seen = (0.0, set())
    sig = record_outcome.s(label="lost")
    engine.send_once([(sig, "lost-id", {}), (sig, "kept-id", {})], {"x": 1}, maybe_sent=False)
    assert set(redis_client.zrange(keys.unreceived(), 0, -1)) == {"lost-id", "kept-id"}
    redriver = Redriver(tracker_app, redis_client)
    # A worker received "kept-id"; "lost-id" was popped and never noted.
    redriver.held.note_received(SimpleNamespace(id="kept-id", message=None))
    redis_client.delete("celery")
    # Missing once may be a message being fetched; missing at the next sweep too, lost.
    assert redriver.follow_ups.resend_lost(now + 1, now + 1) == 0
    assert redriver.follow_ups.resend_lost(now + 2, now + 2) == 1
    [queued] = redis_client.lrange("celery", 0, -1)
    assert json.loads(queued)["headers"]["id"] == "lost-id"
    # Still queued: nothing more is sent.
    assert redriver.follow_ups.resend_lost(now + 3, now + 3) == 0
    assert redis_client.llen("celery") == 1
    for n in range(RESEND_LIMIT - 1):
        redis_client.delete("celery")
        assert redriver.follow_ups.resend_lost(now + 4 + 2 * n, now + 4 + 2 * n) == 0
        assert redriver.follow_ups.resend_lost(now + 5 + 2 * n, now + 5 + 2 * n) == 1
    redis_client.delete("celery")
    assert redriver.follow_ups.resend_lost(now + 20, now + 20) == 0
    assert redriver.follow_ups.resend_lost(now + 21, now + 21) == 0
    assert redis_client.zcard(keys.unreceived()) == 0
    assert redis_client.hlen(keys.unreceived_sends()) == 0


def test_a_follow_up_a_tracking_run_sent_during_the_sweep_is_not_sent_twice(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two senders of one lost callback: the sweep (missing at two sweeps) and the
    re-driven tracking run (its claimer died before marking it sent). The run sends it
    while the sweep is deciding: the sweep finds its entry changed and leaves it. One copy
    is queued (a crash run once showed both, received 3 ms apart)."""
    engine = tracker_app.engine
    keys = Keys()
    now = time.time()
    redis_client.hset(keys.worker_queues(), "celery", repr(now))
    engine.dispatcher.queues_seen = (0.0, set())
    sig = record_outcome.s(label="race")
    engine.send_once([(sig, "race-id", {})], {"x": 1}, maybe_sent=False)
    redis_client.delete("celery")  # popped by a worker killed before it noted it
    redriver = Redriver(tracker_app, redis_client)
    assert redriver.follow_ups.resend_lost(now + 1, now + 1) == 0  # missing once
    locate = engine.broker.locate

    def run_sends_it_meanwhile(task_ids: Any, sigs: Any) -> dict[str, str | None]:
        found = locate(task_ids, sigs)  # the sweep looks: gone
        monkeypatch.setattr(engine.broker, "locate", locate)
        engine.send_once([(sig, "race-id", {})], {"x": 1}, maybe_sent=True)  # the run sends
        return found

    monkeypatch.setattr(engine.broker, "locate", run_sends_it_meanwhile)
    assert redriver.follow_ups.resend_lost(now + 2, now + 2) == 0
    [queued] = redis_client.lrange("celery", 0, -1)
    assert json.loads(queued)["headers"]["id"] == "race-id"


def test_follow_ups_to_queues_no_tracker_worker_consumes_are_not_watched(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """Only a queue a tracker worker consumes confirms receipts: a callback routed
    elsewhere is sent once and not watched (it would look lost forever)."""
    engine = tracker_app.engine
    engine.dispatcher.queues_seen = (0.0, set())
    engine.send_once([(record_outcome.s(label="x"), "own-id", {})], {"x": 1}, maybe_sent=False)
    assert redis_client.zcard(Keys().unreceived()) == 0
    assert redis_client.llen("celery") == 1


def test_a_sweep_over_a_large_due_index_is_done_in_bounded_calls(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 trackings in the due index, 450 of them lost: no read of an index takes more
    than SWEEP_LIMIT entries, each sweep re-drives at most that many, and a few sweeps
    re-drive every lost tracking and nothing else."""
    keys = Keys()
    now = time.time()
    lost = {f"big-{i}" for i in range(0, 5_000, 11)}  # 455 of them
    pipe = redis_client.pipeline(transaction=False)
    for i in range(5_000):
        mid = f"big-{i}"
        pipe.hset(
            keys.session(mid),
            mapping={"owner": "t-1", "run": 0, "started_at": now - 30, "deadline_at": now + 60},
        )
        pipe.zadd(keys.due(), {Keys.due_message(mid): now - 20 if mid in lost else now + 30})
    pipe.execute()
    reads: list[int | None] = []
    read = redis_client.zrangebyscore

    def bounded_read(name: str, low: Any, high: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs.get("num"))
        return read(name, low, high, *args, **kwargs)

    monkeypatch.setattr(redis_client, "zrangebyscore", bounded_read)
    redriver = Redriver(tracker_app, redis_client)
    sweeps = []
    while redriven := redriver.sweep():
        sweeps.append(redriven)
    assert sweeps == [SWEEP_LIMIT, SWEEP_LIMIT, len(lost) - 2 * SWEEP_LIMIT]
    assert reads
    assert all(num is not None and num <= SWEEP_LIMIT for num in reads)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(5_000):
        pipe.hget(keys.session(f"big-{i}"), "owner")
    owners = dict(zip((f"big-{i}" for i in range(5_000)), pipe.execute(), strict=True))
    assert {m for m, owner in owners.items() if owner != "t-1"} == lost
    assert redis_client.llen(TRACK_LIST) == len(lost)


def test_a_lost_chains_large_batch_is_put_back_in_bounded_calls(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost tick had claimed more than RELEASE_CHUNK messages: they are all due again
    before the new run is sent, RELEASE_CHUNK at most a call."""
    keys = Keys()
    now = time.time()
    ids = [f"bb-{i}" for i in range(2 * RELEASE_CHUNK + 200)]
    redis_client.hset(keys.campaign("big"), mapping={"tick:0": "old:3"})
    redis_client.zadd(keys.campaign_due("big"), dict.fromkeys(ids, now + 60))
    redis_client.zadd(keys.campaign_claimed("big", 0), dict.fromkeys(ids, now - 5))
    redis_client.zadd(keys.due(), {"c:big:0": now - 20})
    calls: list[int] = []
    release = ReleaseBatch.__call__

    def counted(self: ReleaseBatch, campaign_due: str, claimed: str, at: float, limit: int) -> int:
        calls.append(limit)
        return release(self, campaign_due, claimed, at, limit)

    monkeypatch.setattr(ReleaseBatch, "__call__", counted)
    assert Redriver(tracker_app, redis_client).sweep() == 1
    assert calls == [RELEASE_CHUNK] * 3
    assert redis_client.zcount(keys.campaign_due("big"), "-inf", time.time()) == len(ids)
    assert not redis_client.exists(keys.campaign_claimed("big", 0))
    assert redis_client.hget(keys.campaign("big"), "tick:0") != "old:3"


def test_a_worker_holding_thousands_of_tasks_beats_and_retires(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A held set larger than one command's worth is written in full, and forgotten at a
    retire that finds none of it unacked."""
    redriver = Redriver(tracker_app, redis_client)
    requests = [
        SimpleNamespace(id=f"id-{i}", message=SimpleNamespace(delivery_tag=f"tag-{i}"))
        for i in range(3 * HELD_CHUNK + 7)
    ]
    assert redriver.held.note_held(requests, time.time()) == 0
    key = Keys().held(redriver.holder)
    assert redis_client.scard(key) == len(requests)
    redriver.held.retire(time.time())
    assert not redis_client.exists(key)
    assert redis_client.zcard(Keys().holders()) == 0


def test_unreadable_queues_are_logged_not_silently_unwatched(
    tracker_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queues this worker consumes: read from the app; an app whose queue settings
    cannot be read gives none, and says why (its follow-ups' receipts go unwatched)."""
    from smsbat_tracker.celery.redrive import held

    assert "celery" in held.consumed_queues(tracker_app)
    logged: list[tuple[str, dict[str, Any]]] = []
    recorder = SimpleNamespace(warning=lambda event, **kw: logged.append((event, kw)))
    monkeypatch.setattr(held, "log", recorder)
    assert held.consumed_queues(SimpleNamespace()) == []
    [(event, fields)] = logged
    assert event == "redrive.queues_unknown"
    assert fields["error"].startswith("AttributeError")


def test_a_follow_up_a_killed_worker_fetched_but_never_noted_goes_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A callback kombu moved to its unacked hash for a worker killed before it noted it is
    in no held set, and would wait for kombu's visibility timeout (an hour): once fetched
    longer ago than ORPHAN_AFTER it goes back to its queue. One fetched more recently (its
    worker may be reconnecting after a failover), or one a live worker holds, stays."""
    engine = tracker_app.engine
    keys = Keys()
    now = time.time()
    redis_client.hset(keys.worker_queues(), "celery", repr(now))  # a tracker worker's queue
    engine.dispatcher.queues_seen = (0.0, set())
    sig = record_outcome.s(label="orphan")
    engine.send_once([(sig, "orphan-id", {}), (sig, "held-id", {})], {"x": 1}, maybe_sent=False)
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    fetched = {}
    for _ in range(2):
        message = channel.basic_get("celery", no_ack=False)
        fetched[message.headers["id"]] = message
    assert redis_client.llen("celery") == 0
    redriver, alive = Redriver(tracker_app, redis_client), Redriver(tracker_app, redis_client)
    # Just fetched: the fetcher may be noting it now.
    assert redriver.follow_ups.resend_lost(now + 1, now + 1) == 0
    assert redis_client.hlen("unacked") == 2
    recently = now + ORPHAN_AFTER - 1
    alive.held.note_held([SimpleNamespace(message=fetched["held-id"])], recently)
    assert redriver.follow_ups.resend_lost(recently, recently) == 0
    assert redis_client.hlen("unacked") == 2
    later = now + ORPHAN_AFTER + 1
    alive.held.note_held([SimpleNamespace(message=fetched["held-id"])], later)
    assert redriver.follow_ups.resend_lost(later, later) == 0  # given back, not sent again
    assert redis_client.hkeys("unacked") == [str(fetched["held-id"].delivery_tag)]
    [queued] = redis_client.lrange("celery", 0, -1)
    assert json.loads(queued)["headers"]["id"] == "orphan-id"
    connection.release()


def test_a_follow_up_acknowledged_without_its_receipt_note_is_not_sent_again(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """The note made at receipt can be lost (a Sentinel failover: written to the old
    master). The acknowledgement notes the receipt again on the broker's own connection,
    just before it: a follow-up acknowledged is never sent again by the sweep."""
    from smsbat_tracker.celery.redrive.follow_ups import note_receipt_on_ack
    from smsbat_tracker.engine.dispatch import FOLLOW_UP_HEADER

    engine = tracker_app.engine
    keys = Keys()
    now = time.time()
    redis_client.hset(keys.worker_queues(), "celery", repr(now))
    engine.dispatcher.queues_seen = (0.0, set())
    engine.send_once(
        [(record_outcome.s(label="acked"), "acked-id", {})], {"x": 1}, maybe_sent=False
    )
    kombu_qos.install(redis_client, before_ack=note_receipt_on_ack(keys))
    connection = tracker_app.connection_for_write()
    try:
        message = connection.default_channel.basic_get("celery", no_ack=False)
        assert message.headers[FOLLOW_UP_HEADER] == "1"
        assert redis_client.zscore(keys.unreceived(), "acked-id") is not None  # never noted
        message.ack()
        assert redis_client.zscore(keys.unreceived(), "acked-id") is None
        assert not redis_client.hexists(keys.unreceived_sends(), "acked-id")
        # Marked as run, for a while: a copy a failover brings back is skipped (test_fence).
        assert 0 < redis_client.ttl(keys.ran("acked-id")) <= RAN_FOR
        redriver = Redriver(tracker_app, redis_client)
        for later in (now + 30, now + 60):
            assert redriver.follow_ups.resend_lost(later, later) == 0
        assert redis_client.llen("celery") == 0
    finally:
        kombu_qos._BEFORE_ACK.clear()
        connection.release()


def test_the_follow_up_header_keeps_the_headers_a_callback_carries(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """The header that marks a watched follow-up is added to the callback's own message
    headers, not put in their place."""
    from smsbat_tracker.engine.dispatch import FOLLOW_UP_HEADER

    engine = tracker_app.engine
    redis_client.hset(Keys().worker_queues(), "celery", repr(time.time()))
    engine.dispatcher.queues_seen = (0.0, set())
    sig = record_outcome.s(label="hdr").set(headers={"tenant": "acme"})
    engine.send_once([(sig, "hdr-id", {})], {"x": 1}, maybe_sent=False)
    [queued] = redis_client.lrange("celery", 0, -1)
    headers = json.loads(queued)["headers"]
    assert headers["tenant"] == "acme"
    assert headers[FOLLOW_UP_HEADER] == "1"


def test_an_acknowledgement_a_failover_lost_is_made_again_at_the_first_beat_back(
    tracker_app: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A master that dies may not have passed its last writes on to the replica promoted:
    a follow-up acknowledged (and marked ran) just before the outage comes back unacked and
    unmarked on the new master. The first beat after the outage makes the acknowledgement
    again, mark included, before anything is given back: the follow-up neither runs again
    (the fence finds the mark) nor is given back by the sweep."""
    from smsbat_tracker.celery.redrive.follow_ups import note_receipt_on_ack

    engine = tracker_app.engine
    keys = Keys()
    now = time.time()
    redis_client.hset(keys.worker_queues(), "celery", repr(now))
    engine.dispatcher.queues_seen = (0.0, set())
    engine.send_once([(record_outcome.s(label="fo"), "fo-id", {})], {"x": 1}, maybe_sent=False)
    kombu_qos.install(redis_client, before_ack=note_receipt_on_ack(keys))
    connection = tracker_app.connection_for_write()
    redriver = Redriver(tracker_app, redis_client)
    try:
        message = connection.default_channel.basic_get("celery", no_ack=False)
        assert redriver.held.note_held([SimpleNamespace(message=message)], now) == 0
        tag = str(message.delivery_tag)
        unacked = redis_client.hget("unacked", tag)
        message.ack()
        assert redis_client.exists(keys.ran("fo-id"))
        # The failover: the new master never saw the acknowledgement.
        redis_client.hset("unacked", tag, unacked or "")
        redis_client.zadd("unacked_index", {tag: now})
        redis_client.delete(keys.ran("fo-id"))

        def away(*args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("Error 111 connecting to the old master")

        monkeypatch.setattr(redriver.held.redis, "pipeline", away)
        with pytest.raises(redis.ConnectionError):
            redriver.held.note_held([], now + 1)
        monkeypatch.undo()  # the new master answers
        assert redriver.held.note_held([], now + 2) == 0
        assert not redis_client.hexists("unacked", tag)
        assert redis_client.zscore("unacked_index", tag) is None
        assert redis_client.exists(keys.ran("fo-id"))
        assert redriver.held.note_held([], now + 3) == 0
        assert redis_client.llen("celery") == 0
    finally:
        kombu_qos._BEFORE_ACK.clear()
        connection.release()
