"""The tracking session's Lua scripts (store/lua/session_*.lua), each run through its typed
wrapper (store/session_scripts.py) on the test Redis: what each returns and what Redis holds
after."""

from __future__ import annotations

import json
import re
import time
from typing import Any
from uuid import uuid4

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.broker import SCAN_BUDGET, Broker
from smsbat_tracker.engine.sessions import Sessions
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.keys import Keys, kombu_queue_list
from smsbat_tracker.store.ratelimit import RateLimiter
from smsbat_tracker.store.scripts import source
from smsbat_tracker.store.session_scripts import (
    ANSWER_ARGS,
    SESSION_FIELDS,
    AbandonCode,
    AbandonSession,
    AfterCheck,
    AfterCode,
    BeforeCheck,
    InBroker,
    MarkSent,
    Ran,
    RegisterSession,
    ReleaseClaims,
    Reschedule,
    ScanPlace,
    SentCode,
    SessionOpening,
    Settle,
    TakeTurn,
    TurnAsk,
    TurnCode,
)

MID = "m1"
SUB = json.dumps({"on_delivered": {"task": "t"}})


@pytest.fixture
def keys() -> Keys:
    """Keys under a prefix of this test's own."""
    return Keys(f"t{uuid4().hex[:8]}")


def opening(owner: str = "t-1", due_at: float = 150.0) -> SessionOpening:
    return SessionOpening(
        owner=owner,
        started_at=100.0,
        deadline_at=200.0,
        ttl_ms=60_000,
        due_at=due_at,
        due_member=Keys.due_message(MID),
    )


def turn_ask(keys: Keys, limiter: RateLimiter, *, waiter: str = "") -> TurnAsk:
    return TurnAsk(
        gate=keys.poll_gate(MID),
        gate_ms=1_000,
        limit_on=limiter.enabled,
        limit_keys=limiter.keys,
        limit_args=limiter.script_args(1, ahead=0.0, waiter=waiter),
    )


def register(client: redis.Redis, keys: Keys, *, owner: str = "t-1", sub: str = "s1") -> Any:
    return RegisterSession(client)(
        session=keys.session(MID),
        subs=keys.subs(MID),
        status=keys.status(MID),
        due=keys.due(),
        outcome=keys.outcome(MID),
        opening=opening(owner),
        subscription=sub,
        subscription_json=SUB,
        subs_ttl_ms=90_000,
    )


def test_the_session_fields_agree() -> None:
    """lib/session.lua reads a session's fields in SESSION_FIELDS' order."""
    text = source("lib/session.lua")
    block = re.search(r"local SESSION_FIELDS = \{(.*?)\}", text, re.DOTALL)
    assert block is not None
    assert tuple(re.findall(r"'([\w:]+)'", block.group(1))) == SESSION_FIELDS
    places = re.search(r"local SESSION_OWNER, SESSION_RUN = (\d+), (\d+)", text)
    assert places is not None
    owner_at, run_at = places.groups()
    assert SESSION_FIELDS[int(owner_at) - 1] == "owner"
    assert SESSION_FIELDS[int(run_at) - 1] == "run"


def test_register_opens_the_session_once_and_adds_the_subscription(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A first registration opens the session (run 0, due at its first run) and adds the
    subscription; a second one by another owner finds that session, and a new subscription
    joining it gets a due entry only if the message has none."""
    first = register(redis_client, keys)
    assert dict(zip(SESSION_FIELDS, first.fields, strict=True)) == {
        "owner": "t-1",
        "started_at": "100.0",
        "deadline_at": "200.0",
        "checks": "0",
        "polls": "0",
        "pushed": None,
        "run": "0",
        "failures": None,
        "why:in_flight": None,
        "why:no_turn": None,
        "why:request_failed": None,
        "why:awaiting_push": None,
    }
    assert (first.added, first.cached, first.ended) == (True, None, False)
    assert redis_client.hgetall(keys.subs(MID)) == {"s1": SUB}
    assert 0 < redis_client.pttl(keys.session(MID)) <= 60_000
    assert 0 < redis_client.pttl(keys.subs(MID)) <= 90_000
    assert redis_client.zrange(keys.due(), 0, -1, withscores=True) == [("m:m1", 150.0)]
    assert float(redis_client.hget(keys.session(MID), "due") or 0) == 150.0

    redis_client.set(keys.status(MID), "cached")
    redis_client.set(keys.outcome(MID), "{}")
    again = register(redis_client, keys, owner="t-2", sub="s1")
    assert (again.fields[0], again.added, again.cached, again.ended) == (
        "t-1",
        False,
        "cached",
        True,
    )
    redis_client.zadd(keys.due(), {"m:m1": 10.0})
    joined = register(redis_client, keys, owner="t-3", sub="s2")
    assert joined.added
    assert redis_client.zscore(keys.due(), "m:m1") == 10.0  # ZADD NX: the entry in force stays
    redis_client.delete(keys.due())
    register(redis_client, keys, owner="t-4", sub="s3")
    assert redis_client.zscore(keys.due(), "m:m1") == 150.0  # re-driven if its run is lost


def test_register_without_a_subscription_writes_none(redis_client: redis.Redis, keys: Keys) -> None:
    """An empty subscription ('') leaves no subscriptions hash."""
    assert not register(redis_client, keys, sub="").added
    assert not redis_client.exists(keys.subs(MID))
    assert redis_client.hget(keys.session(MID), "owner") == "t-1"


def test_take_turn_holds_the_gate_then_asks_the_rate_limit(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """An open gate and a token: TAKEN, and the gate closes for gate_ms; closed: GATE with
    the ms left; no token: RATE, and the gate stays open."""
    take = TakeTurn(redis_client)
    off = RateLimiter(redis_client, settings, keys, rate=0)
    taken = take(turn_ask(keys, off))
    assert (taken.code, taken.wait) == (TurnCode.TAKEN, 0)
    assert 0 < redis_client.pttl(keys.poll_gate(MID)) <= 1_000
    gated = take(turn_ask(keys, off))
    assert gated.code == TurnCode.GATE
    assert 0 < gated.wait <= 1_000

    redis_client.delete(keys.poll_gate(MID))
    limiter = RateLimiter(redis_client, settings, keys, rate=1, burst=1)
    assert take(turn_ask(keys, limiter)).code == TurnCode.TAKEN
    redis_client.delete(keys.poll_gate(MID))
    refused = take(turn_ask(keys, limiter))
    assert refused.code == TurnCode.RATE
    assert 0 < refused.wait <= 1_000_000  # us
    assert not redis_client.exists(keys.poll_gate(MID))


def test_before_check_opens_reads_and_takes_a_turn_for_the_expected_run(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """The before-check opens a missing session and gives its expected run a turn; another
    owner, another run, or a recorded outcome gets none (NONE); it returns the outcome's
    result line alone and the cached status."""
    before = BeforeCheck(redis_client)
    limiter = RateLimiter(redis_client, settings, keys, rate=0)

    def run_before(owner: str, run: int) -> Any:
        return before(
            session=keys.session(MID),
            outcome=keys.outcome(MID),
            status=keys.status(MID),
            due=keys.due(),
            opening=opening(owner),
            run=run,
            turn=turn_ask(keys, limiter),
        )

    first = run_before("t-1", 0)
    assert first.fields[0] == "t-1"
    assert (first.outcome, first.cached, first.turn.code) == ("", "", TurnCode.TAKEN)
    assert redis_client.zscore(keys.due(), "m:m1") == 150.0
    redis_client.delete(keys.poll_gate(MID))
    assert run_before("t-2", 0).turn.code == TurnCode.NONE  # not the owner
    assert run_before("t-1", 1).turn.code == TurnCode.NONE  # not the run it expects
    assert not redis_client.exists(keys.poll_gate(MID))
    redis_client.set(keys.status(MID), "cached")
    redis_client.set(keys.outcome(MID), '{"outcome":"delivered"}\ns1,s2')
    ended = run_before("t-1", 0)
    assert (ended.outcome, ended.cached) == ('{"outcome":"delivered"}', "cached")
    assert ended.turn.code == TurnCode.NONE


def _before_in_line(
    client: redis.Redis, keys: Keys, limiter: RateLimiter, *, run: int, due_at: float
) -> Any:
    """A tracking's run asking for its turn, 0.25 s its own wait, in the line by due_at."""
    return BeforeCheck(client)(
        session=keys.session(MID),
        outcome=keys.outcome(MID),
        status=keys.status(MID),
        due=keys.due(),
        opening=opening(),
        run=run,
        turn=TurnAsk(
            gate=keys.poll_gate(MID),
            gate_ms=1_000,
            limit_on=True,
            limit_keys=limiter.keys,
            limit_args=limiter.script_args(
                1, ahead=0.25, waiter=Keys.due_message(MID), due_at=due_at
            ),
        ),
    )


def test_a_check_turned_away_keeps_its_place_in_the_line_through_its_next_runs(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """A run the rate limit turns away leaves in the session when its check fell due; the
    next runs ask with that time (not their own, later ETA) even after the line forgot the
    waiter (its worker died and the run came back late); a check made clears it."""
    register(redis_client, keys)
    limiter = RateLimiter(redis_client, settings, keys, rate=1.0)
    waiters, now = limiter.keys[2], time.time()
    earlier = {"someone-earlier": int((now - 100) * 1e6)}  # first in line: no ticket here
    limiter.reserve(1, ahead=0.0)  # the one token of this second is gone
    redis_client.zadd(waiters, earlier)
    assert _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 30).turn.code == (
        TurnCode.RATE
    )
    assert redis_client.hget(keys.session(MID), "line") == str(int((now - 30) * 1e6))
    redis_client.delete(waiters)  # the line forgot it: it came back too late
    redis_client.zadd(waiters, earlier)
    again = _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 1)
    assert again.turn.code == TurnCode.RATE
    assert redis_client.zscore(waiters, Keys.due_message(MID)) == int((now - 30) * 1e6)
    after(redis_client, keys, limiter, Reschedule("t-1", 0, 300.0, Ran.NEITHER, "rate_limited"))
    assert redis_client.hget(keys.session(MID), "line") is not None  # still not checked
    after(redis_client, keys, limiter, Reschedule("t-1", 1, 300.0, Ran.ANSWERED, "in_flight"))
    assert redis_client.hget(keys.session(MID), "line") is None


def test_the_first_in_line_books_a_ticket_its_next_run_takes(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """First in line, a run whose token is due beyond its own wait books it anyway (a
    ticket in the session) and is told to come back for it: later callers, who may book
    within the line's window, can no longer take every token before it comes back. The
    next run takes the ticket once it is due within its wait, without booking another; a
    run too late for it asks again."""
    register(redis_client, keys)
    limiter = RateLimiter(redis_client, settings, keys, rate=1.0)
    session, now = keys.session(MID), time.time()
    limiter.reserve(1, ahead=0.0)  # the one token of this second is gone
    first = _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 5)
    assert first.turn.code == TurnCode.RATE
    ticket = int(redis_client.hget(session, "ticket") or 0)
    assert now * 1e6 < ticket <= (now + 2) * 1e6
    booked = redis_client.get(limiter.keys[0])
    early = _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 5)
    assert early.turn.code == TurnCode.RATE  # come back later: nothing booked again
    assert redis_client.get(limiter.keys[0]) == booked
    redis_client.hset(session, "ticket", int((time.time() + 0.1) * 1e6))  # due: take it
    taken = _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 5)
    assert taken.turn.code == TurnCode.TAKEN
    assert taken.turn.wait <= 100_000
    assert redis_client.hget(session, "ticket") is None
    assert redis_client.get(limiter.keys[0]) == booked
    redis_client.delete(keys.poll_gate(MID))
    stale = int((time.time() - 5) * 1e6)
    redis_client.hset(session, "ticket", stale)  # came far too late for it
    late = _before_in_line(redis_client, keys, limiter, run=0, due_at=now - 5)
    assert redis_client.hget(session, "ticket") != str(stale)
    # Asked again, in its place: booked a token of its own, or told to come back.
    assert late.turn.code == TurnCode.RATE or redis_client.get(limiter.keys[0]) != booked


def test_abandon_drops_the_owners_session_and_the_subscription(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Its owner's session is dropped (DROPPED); another owner's stays (KEPT); the named
    subscription goes either way."""
    register(redis_client, keys, owner="t-1", sub="s1")
    redis_client.hset(keys.subs(MID), "s2", SUB)
    abandon = AbandonSession(redis_client)
    session, subs = keys.session(MID), keys.subs(MID)
    assert abandon(session=session, subs=subs, owner="t-2", subscription="s1") == AbandonCode.KEPT
    assert redis_client.exists(session)
    assert abandon(session=session, subs=subs, owner="t-1", subscription="") == AbandonCode.DROPPED
    assert not redis_client.exists(session)
    assert redis_client.hkeys(subs) == ["s2"]


def after(
    client: redis.Redis,
    keys: Keys,
    limiter: RateLimiter,
    step: Reschedule | Settle,
    **check: Any,
) -> Any:
    values: dict[str, Any] = {
        "count_poll": False,
        "mark_pushed": False,
        "unknown_status": "",
        "unused_turn_us": None,
        "pause_ms": None,
        "answer": None,
        **check,
    }
    return AfterCheck(client)(
        session=keys.session(MID),
        status=keys.status(MID),
        due=keys.due(),
        outcome=keys.outcome(MID),
        subs=keys.subs(MID),
        claims=keys.claims(MID),
        gate=keys.poll_gate(MID),
        bucket=limiter.keys[0],
        pause_key=limiter.keys[1],
        due_member=Keys.due_message(MID),
        step=step,
        **values,
    )


def test_after_check_writes_the_check_and_reschedules_the_expected_run(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """The answer is cached, the poll counted, pushes and an unknown status (once) noted, a
    failure counted and an answer clearing it; the run moves on and is due at next_at (in the
    due index and the session). A
    run the session no longer expects is SUPERSEDED and schedules nothing."""
    register(redis_client, keys)
    limiter = RateLimiter(redis_client, settings, keys, rate=0)
    cache = StatusCache(redis_client, settings, keys)
    session = keys.session(MID)
    failed = after(
        redis_client, keys, limiter, Reschedule("t-1", 0, 300.0, Ran.FAILED, "request_failed")
    )
    assert (failed.code, failed.settled) == (AfterCode.DONE, None)
    assert redis_client.hmget(session, "run", "failures", "checks") == ["1", "1", "0"]
    assert redis_client.hget(session, "why:request_failed") == "1"  # the retry's reason
    answer = MessageStatus.model_validate({"deliverystatus": "weird"})
    done = after(
        redis_client,
        keys,
        limiter,
        Reschedule("t-1", 1, 400.0, Ran.ANSWERED, "in_flight"),
        count_poll=True,
        mark_pushed=True,
        unknown_status="weird",
        answer=cache.store_args(answer, source="poll"),
    )
    assert (done.code, done.unknown_new, done.paused) == (AfterCode.DONE, True, False)
    assert redis_client.hmget(session, "run", "failures", "checks", "polls", "pushed") == [
        "2",
        None,
        "1",
        "1",
        "1",
    ]
    assert redis_client.zscore(keys.due(), "m:m1") == 400.0
    cached = cache.get(MID)
    assert cached is not None
    assert cached.status.deliverystatus == "weird"
    again = after(
        redis_client,
        keys,
        limiter,
        Reschedule("t-1", 2, 500.0, Ran.NEITHER),
        unknown_status="weird",
    )
    assert (again.code, again.unknown_new) == (AfterCode.DONE, False)
    stale = after(redis_client, keys, limiter, Reschedule("t-1", 2, 900.0, Ran.ANSWERED))
    assert stale.code == AfterCode.SUPERSEDED
    assert redis_client.hmget(session, "run", "checks") == ["3", "1"]
    assert redis_client.zscore(keys.due(), "m:m1") == 500.0
    assert float(redis_client.hget(session, "due") or 0) == 500.0  # a re-drive's place
    parsed = Sessions.parse(MID, redis_client.hmget(session, list(SESSION_FIELDS)))
    assert parsed is not None
    assert parsed.retries == {"in_flight": 1, "request_failed": 1}  # NEITHER's had no kind
    assert len(cache.store_args(answer, source="poll")) == ANSWER_ARGS


def test_after_check_gives_an_unused_turn_back_and_pauses_after_a_429(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """An unused turn opens the gate and returns its token to the bucket; a 429's pause
    stops every caller (paused once: a second pause too soon after is refused)."""
    register(redis_client, keys)
    limiter = RateLimiter(redis_client, settings, keys, rate=10, burst=1)
    assert limiter.reserve(1, ahead=0.0)[0]
    tat = int(redis_client.get(limiter.keys[0]) or 0)
    redis_client.set(keys.poll_gate(MID), 1, px=1_000)
    step = Reschedule("t-1", 0, 300.0, Ran.NEITHER)
    given = after(
        redis_client, keys, limiter, step, unused_turn_us=limiter.interval_us, pause_ms=500
    )
    assert given.paused
    assert not redis_client.exists(keys.poll_gate(MID))
    assert int(redis_client.get(limiter.keys[0]) or 0) == tat - int(limiter.interval_us)
    assert 1_000 < redis_client.pttl(limiter.keys[1]) <= 2_000  # SPACING times the pause
    step = Reschedule("t-1", 1, 300.0, Ran.NEITHER)
    assert not after(redis_client, keys, limiter, step, pause_ms=500).paused


def settle_step(claimer: str, result: dict[str, Any] | None, *, now_ms: int) -> Settle:
    return Settle(
        result_json=json.dumps(result) if result is not None else "",
        outcome_ttl_ms=60_000,
        claimer=claimer,
        now_ms=now_ms,
        stale_ms=5_000,
    )


def test_after_check_settles_once_and_claims_each_subscription_once(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """The first settle records the outcome and claims the subscriptions (the message due
    now, until they are sent); another claimer claims nothing while the claim is fresh,
    and takes it over (retaken) once it is stale; a settle with nothing recorded and no
    result does nothing."""
    limiter = RateLimiter(redis_client, settings, keys, rate=0)
    assert (
        after(redis_client, keys, limiter, settle_step("a", None, now_ms=1)).settled.outcome == ""
    )
    assert not redis_client.exists(keys.outcome(MID))
    register(redis_client, keys)
    now_ms = int(time.time() * 1000)
    first = after(
        redis_client, keys, limiter, settle_step("a", {"outcome": "delivered"}, now_ms=now_ms)
    )
    assert first.code == AfterCode.DONE
    assert first.settled.recorded
    assert json.loads(first.settled.outcome) == {"outcome": "delivered"}
    assert first.settled.claimed == [("s1", SUB)]
    assert redis_client.hget(keys.claims(MID), "s1") == f"pending:a:{now_ms}"
    assert redis_client.hget(keys.session(MID), "finished") == "1"
    assert redis_client.zscore(keys.due(), "m:m1") == pytest.approx(now_ms / 1000)
    other = after(
        redis_client, keys, limiter, settle_step("b", {"outcome": "x"}, now_ms=now_ms + 1)
    )
    assert not other.settled.recorded
    assert other.settled.claimed == []
    assert json.loads(other.settled.outcome) == {"outcome": "delivered"}  # the first word stays
    late = after(redis_client, keys, limiter, settle_step("b", None, now_ms=now_ms + 6_000))
    assert late.settled.claimed == [("s1", SUB)]
    assert late.settled.retaken == frozenset({"s1"})


def test_after_check_settle_with_nothing_to_send_cuts_the_tracking_to_its_outcome(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """With every subscription sent, a settle leaves the outcome alone (the served ids noted
    after its result) and the message leaves the due index."""
    limiter = RateLimiter(redis_client, settings, keys, rate=0)
    register(redis_client, keys)
    redis_client.hset(keys.claims(MID), "s1", "sent")
    redis_client.set(keys.status(MID), "cached")
    settled = after(redis_client, keys, limiter, settle_step("a", {"outcome": "failed"}, now_ms=1))
    assert settled.settled.claimed == []
    assert redis_client.get(keys.outcome(MID)) == '{"outcome": "failed"}\ns1'
    for gone in (keys.session(MID), keys.subs(MID), keys.claims(MID), keys.status(MID)):
        assert not redis_client.exists(gone)
    assert redis_client.zscore(keys.due(), "m:m1") is None


def mark_sent(client: redis.Redis, keys: Keys, subscription: str) -> SentCode:
    return MarkSent(client)(
        claims=keys.claims(MID),
        subs=keys.subs(MID),
        due=keys.due(),
        outcome=keys.outcome(MID),
        session=keys.session(MID),
        status=keys.status(MID),
        due_member=Keys.due_message(MID),
        subscription=subscription,
    )


def test_mark_sent_cuts_back_once_the_last_dispatch_is_sent(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """SOME_LEFT while another subscription is unsent; ALL_SENT with the last: the message
    leaves the due index and keeps its outcome alone, the served ids after its result."""
    register(redis_client, keys)
    redis_client.hset(keys.subs(MID), "s2", SUB)
    redis_client.hset(keys.claims(MID), mapping={"s1": "pending:a:1", "s2": "pending:a:1"})
    redis_client.set(keys.outcome(MID), '{"outcome":"delivered"}')
    assert mark_sent(redis_client, keys, "s1") == SentCode.SOME_LEFT
    assert redis_client.hget(keys.claims(MID), "s1") == "sent"
    assert redis_client.zscore(keys.due(), "m:m1") is not None
    assert mark_sent(redis_client, keys, "s2") == SentCode.ALL_SENT
    assert redis_client.zscore(keys.due(), "m:m1") is None
    outcome, _, served = str(redis_client.get(keys.outcome(MID))).partition("\n")
    assert outcome == '{"outcome":"delivered"}'
    assert set(served.split(",")) == {"s1", "s2"}
    assert not redis_client.exists(keys.session(MID), keys.subs(MID), keys.claims(MID))


def test_release_gives_back_only_this_claimers_claims(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """This claimer's pending claims are dropped; another's, and sent ones, stay."""
    claims = keys.claims(MID)
    redis_client.hset(
        claims,
        mapping={"s1": "pending:a:1", "s2": "pending:b:1", "s3": "sent", "s4": "pending:a:2"},
    )
    released = ReleaseClaims(redis_client)(
        claims=claims, mark_prefix="pending:a:", subscriptions=["s1", "s2", "s3"]
    )
    assert released == 1
    assert redis_client.hgetall(claims) == {"s2": "pending:b:1", "s3": "sent", "s4": "pending:a:2"}


def test_in_broker_finds_ids_in_the_queues_and_the_unacked_hash(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Ids carried by a queued message (any priority list) or an unacknowledged one are
    found (the latter with its delivery tag); others are not. A slice stops at its budget
    and says where to go on."""
    queue = f"{keys.prefix}-q"
    high = kombu_queue_list(queue, 3)
    unacked = f"{keys.prefix}-unacked"
    redis_client.lpush(queue, '{"headers": {"id": "in-queue"}}', "other")
    redis_client.lpush(high, '{"headers": {"id": "in-high"}}')
    redis_client.hset(unacked, "tag-1", '[{"headers": {"id": "held"}}, "", "q"]')
    scan = InBroker(redis_client)
    ids = ["in-queue", "in-high", "held", "gone"]
    whole = scan(
        unacked=unacked,
        queues=[queue, high],
        budget=100,
        at=ScanPlace.FIRST,
        cursor="0",
        task_ids=ids,
    )
    assert whole.done
    assert whole.found == {"in-queue", "in-high", "held"}
    assert whole.unacked == {"held": "tag-1"}  # fetched: its delivery tag, to give it back
    part = scan(
        unacked=unacked,
        queues=[queue, high],
        budget=1,
        at=ScanPlace.FIRST,
        cursor="0",
        task_ids=ids,
    )
    assert (part.done, part.at, part.cursor) == (False, 1, "1")
    assert part.found == frozenset()  # the newest entry, "other", came first
    found = scan(
        unacked=unacked, queues=[queue], budget=10, at=1, cursor="0", task_ids=["in-queue"]
    )
    assert found.done
    assert found.found == {"in-queue"}


def test_in_broker_scans_a_long_queue_in_bounded_slices(
    redis_client: redis.Redis, keys: Keys, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broker.in_broker reads a 5,000-message backlog SCAN_BUDGET entries a call and still
    finds the oldest message's id, and the unacked hash after the queue."""
    from celery import signature

    queue = f"{keys.prefix}-backlog"
    redis_client.lpush(queue, '{"headers": {"id": "oldest"}}')
    redis_client.lpush(queue, *[f'{{"headers": {{"id": "task-{n}"}}}}' for n in range(4_999)])
    redis_client.hset("unacked", "tag-1", '[{"headers": {"id": "held"}}, "", "q"]')
    broker = Broker(redis_client, None)
    slices: list[int] = []
    original = InBroker.__call__

    def counted(self: InBroker, **kwargs: Any) -> Any:
        slices.append(kwargs["budget"])
        return original(self, **kwargs)

    monkeypatch.setattr(InBroker, "__call__", counted)
    sig = signature("some.task", queue=queue)
    assert broker.in_broker(["oldest", "held", "never"], [sig]) == {"oldest", "held"}
    assert len(slices) >= 5_000 // SCAN_BUDGET
    assert set(slices) == {SCAN_BUDGET}
    slices.clear()
    assert broker.in_broker(["task-4998"], [sig]) == {"task-4998"}  # the newest: at once
    assert len(slices) == 1
