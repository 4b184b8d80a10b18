"""The campaign's Lua scripts (store/lua/campaign_*.lua), each run through its typed wrapper
(store/campaign_scripts.py) on the test Redis: what each returns and what Redis holds after."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.campaign_scripts import (
    AfterBatch,
    AfterBatchReply,
    Claim,
    ClaimedMessage,
    ClaimReport,
    ClaimReportCode,
    Final,
    TakeUnsent,
    TakeUnsentCode,
    TickNext,
    TickNextCode,
    Turn,
    Turns,
)
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import RateLimiter

CAMPAIGN = "camp"


@pytest.fixture
def keys() -> Keys:
    """Keys under a prefix of this test's own."""
    return Keys(f"t{uuid4().hex[:8]}")


def _claim(client: redis.Redis, keys: Keys, *, now: float, run: str) -> list[ClaimedMessage]:
    head, tail = keys.status("\0").split("\0")
    return Claim(client)(
        due_key=keys.campaign_due(CAMPAIGN),
        checks_key=keys.campaign_checks(CAMPAIGN),
        claimed_key=keys.campaign_claimed(CAMPAIGN, 0),
        meta_key=keys.campaign(CAMPAIGN),
        now=now,
        limit=10,
        lease_until=now + 60,
        status_head=head,
        status_tail=tail,
        chain_field="tick:0",
        run=run,
    )


def test_claim_returns_the_due_batch_with_what_the_rules_need(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """campaign_claim.lua claims the due messages (leased, noted as the chain's batch) and
    returns each one's due time, cached entry, checks, failures in a row and pushed mark."""
    now = time.time()
    due, checks = keys.campaign_due(CAMPAIGN), keys.campaign_checks(CAMPAIGN)
    redis_client.hset(keys.campaign(CAMPAIGN), "tick:0", "r:1")
    redis_client.zadd(due, {"a": now - 2, "b": now - 1, "later": now + 30})
    redis_client.hset(checks, mapping={"a": 3, "f:a": 2, "p:a": 1})
    redis_client.set(keys.status("a"), "{entry}")
    claimed = _claim(redis_client, keys, now=now, run="r:1")
    assert claimed == [
        ClaimedMessage("a", pytest.approx(now - 2), "{entry}", 3, 2, True),
        ClaimedMessage("b", pytest.approx(now - 1), "", 0, 0, False),
    ]
    assert redis_client.zscore(due, "a") == pytest.approx(now + 60)
    assert redis_client.zscore(due, "b") == pytest.approx(now + 60)
    assert redis_client.zscore(due, "later") == pytest.approx(now + 30)
    assert redis_client.zrange(keys.campaign_claimed(CAMPAIGN, 0), 0, -1, withscores=True) == [
        ("a", pytest.approx(now - 2)),
        ("b", pytest.approx(now - 1)),
    ]


def test_claim_puts_an_abandoned_batch_back_first_and_a_run_taken_over_claims_nothing(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """campaign_claim.lua: the batch a chain left noted is due again at once, each message
    at the time it fell due, so it keeps its place in the rate limit's line ahead of what
    fell due since; a run that is not the chain's current one claims nothing and changes
    nothing."""
    now = time.time()
    due, noted = keys.campaign_due(CAMPAIGN), keys.campaign_claimed(CAMPAIGN, 0)
    redis_client.hset(keys.campaign(CAMPAIGN), "tick:0", "r:2")
    redis_client.zadd(due, {"lost": now + 60, "since": now - 3})  # "lost": leased, its tick died
    redis_client.zadd(noted, {"lost": now - 7})
    assert _claim(redis_client, keys, now=now, run="r:1") == []
    assert redis_client.zscore(due, "lost") == pytest.approx(now + 60)
    assert redis_client.zrange(noted, 0, -1) == ["lost"]
    back = _claim(redis_client, keys, now=now, run="r:2")
    assert [(c.message_id, c.due_at) for c in back] == [
        ("lost", pytest.approx(now - 7)),
        ("since", pytest.approx(now - 3)),
    ]
    assert redis_client.zrange(noted, 0, -1) == ["lost", "since"]


def test_claim_puts_back_a_batch_an_older_version_noted_as_a_plain_set(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """campaign_claim.lua: a batch noted as a plain set (no due times, as before the claimed
    set kept them) is due again now, and noted anew with its due times."""
    now = time.time()
    due, noted = keys.campaign_due(CAMPAIGN), keys.campaign_claimed(CAMPAIGN, 0)
    redis_client.hset(keys.campaign(CAMPAIGN), "tick:0", "r:2")
    redis_client.zadd(due, {"lost": now + 60})
    redis_client.sadd(noted, "lost")
    [back] = _claim(redis_client, keys, now=now, run="r:2")
    assert (back.message_id, back.due_at) == ("lost", pytest.approx(now))
    assert redis_client.type(noted) == "zset"


def _turns(
    client: redis.Redis,
    keys: Keys,
    limiter: RateLimiter,
    ids: list[str],
    now: float,
    *,
    ahead: float = 5.0,
    chain: bool = False,
) -> Turn:
    """Run campaign_turns.lua for ``ids``, each due a second ago, waiting at most ``ahead``
    for the tokens; ``chain``: as tick chain 0, in the line by that due time, which can
    hold a ticket (taken up to 1 s late)."""
    return Turns(client)(
        rate_keys=limiter.keys,
        due_key=keys.campaign_due(CAMPAIGN),
        gate_keys=[keys.poll_gate(m) for m in ids],
        limited=limiter.enabled,
        gate_ms=1000,
        reserve_args=limiter.script_args(
            len(ids), ahead=ahead, waiter="c:camp:0", due_at=now - 1 if chain else None
        ),
        messages=[(m, now - 1) for m in ids],
        ticket_key=keys.campaign_ticket(CAMPAIGN, 0) if chain else "",
        ticket_grace=1.0,
    )


def test_turns_books_the_batch_takes_the_gates_and_gives_back_the_tokens_of_closed_gates(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """campaign_turns.lua books the batch's tokens, takes each open gate (take_gate, 1 s),
    and gives back the token of a message whose gate was closed."""
    limiter = RateLimiter(redis_client, settings, keys, rate=50)
    sec, usec = redis_client.time()
    tat = sec * 1_000_000 + usec + 500_000  # the bucket booked half a second ahead
    redis_client.set(keys.rate_limit(), tat, px=10_000)
    redis_client.set(keys.poll_gate("b"), 1, px=800)  # b was checked just now
    turn = _turns(redis_client, keys, limiter, ["a", "b"], time.time())
    assert turn.booked
    assert turn.gates == [True, False]
    assert 0 < turn.wait_us <= 600_000
    assert 0 < redis_client.pttl(keys.poll_gate("a")) <= 1000
    assert redis_client.pttl(keys.poll_gate("b")) <= 800  # not taken again
    # Two tokens booked, one given back.
    assert int(redis_client.get(keys.rate_limit())) == tat + limiter.interval_us


def test_turns_without_a_turn_puts_the_batch_back_as_it_was(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """campaign_turns.lua under a pause books nothing, takes no gate, and scores the batch
    back at its due times; with the limit off it only takes the gates."""
    limiter = RateLimiter(redis_client, settings, keys, rate=50)
    limiter.pause(1.0)
    now = time.time()
    due = keys.campaign_due(CAMPAIGN)
    redis_client.zadd(due, {"a": now + 60, "b": now + 60})  # leased by the claim
    turn = _turns(redis_client, keys, limiter, ["a", "b"], now)
    assert not turn.booked
    assert turn.gates == []
    assert 0 < turn.wait_us <= 1_000_000
    assert redis_client.zscore(due, "a") == pytest.approx(now - 1)
    assert redis_client.zscore(due, "b") == pytest.approx(now - 1)
    assert not redis_client.exists(keys.poll_gate("a"), keys.poll_gate("b"))
    off = RateLimiter(redis_client, settings, keys, rate=0)
    turn = _turns(redis_client, keys, off, ["a"], now)
    assert (turn.booked, turn.wait_us, turn.gates) == (True, 0, [True])
    assert redis_client.get(keys.rate_limit()) is None


def test_a_chain_first_in_line_holds_a_ticket_its_next_tick_takes(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """A chain's batch first in line, whose tokens are due beyond its own wait, books them
    anyway (the chain's ticket) and goes back in the due set, told to come back for them:
    trackings behind it can no longer keep the bucket booked further ahead than a batch
    may wait. The chain's next tick takes the ticket, booking nothing more, once it is due
    within its wait; a tick too late for it asks again in its place."""
    limiter = RateLimiter(redis_client, settings, keys, rate=50)
    ticket_key = keys.campaign_ticket(CAMPAIGN, 0)
    sec, usec = redis_client.time()
    tat = sec * 1_000_000 + usec + 700_000  # the bucket booked 0.7 s ahead
    redis_client.set(keys.rate_limit(), tat, px=10_000)
    now = time.time()
    due = keys.campaign_due(CAMPAIGN)
    ids = ["a", "b", "c"]
    pace = len(ids) / limiter.rate + 0.25  # a tick waits its batch's pace and a quarter second

    def turns() -> Turn:
        return _turns(redis_client, keys, limiter, ids, now, ahead=pace, chain=True)

    redis_client.zadd(due, dict.fromkeys(ids, now + 60))  # leased by the claim
    first = turns()
    assert not first.booked  # not yet: the tick comes back when the tokens come due
    assert 0 < first.wait_us <= 700_000
    assert redis_client.zscore(due, "a") == pytest.approx(now - 1)  # back as it was
    booked = int(redis_client.get(keys.rate_limit()))
    assert booked == tat + 3 * limiter.interval_us  # its three tokens are booked
    last, count = redis_client.get(ticket_key).split(":")
    assert count == "3"
    assert int(last) >= tat
    again = turns()  # came back early
    assert not again.booked
    assert int(redis_client.get(keys.rate_limit())) == booked  # nothing booked again
    # Due within the batch's wait: the next tick takes it, gates and all.
    redis_client.set(ticket_key, f"{int((time.time() + 0.1) * 1e6)}:3")
    taken = turns()
    assert taken.booked
    assert taken.gates == [True, True, True]
    assert taken.wait_us <= 100_000
    assert not redis_client.exists(ticket_key)
    assert int(redis_client.get(keys.rate_limit())) == booked
    # Far too late for a ticket: asked again, in its place in the line.
    redis_client.delete(*(keys.poll_gate(m) for m in ids))
    redis_client.set(ticket_key, f"{int((time.time() - 5) * 1e6)}:3")
    turns()
    assert int(redis_client.get(keys.rate_limit())) == booked + 3 * limiter.interval_us


def _after(
    client: redis.Redis,
    keys: Keys,
    *,
    run: str = "r:1",
    pause_ms: int | None = None,
    stores: dict[str, list[Any]] | None = None,
    rescored: dict[str, float] | None = None,
    counted: Sequence[str] = (),
    failed: Sequence[str] = (),
    pushed: Sequence[str] = (),
    finals: Sequence[Final] = (),
) -> AfterBatchReply:
    """Run campaign_after_batch.lua for chain 0 of the campaign."""
    return AfterBatch(client)(
        checks_key=keys.campaign_checks(CAMPAIGN),
        due_key=keys.campaign_due(CAMPAIGN),
        outcomes_key=keys.campaign_outcomes(CAMPAIGN),
        meta_key=keys.campaign(CAMPAIGN),
        unsent_key=keys.campaign_unsent(CAMPAIGN),
        pause_key=keys.rate_pause(),
        claimed_key=keys.campaign_claimed(CAMPAIGN, 0),
        final_ttl_ms=60_000,
        stamp="1700000000000",
        pause_ms=pause_ms,
        chain_field="tick:0",
        run=run,
        stores=stores or {},
        rescored=rescored or {},
        counted=counted,
        failed=failed,
        pushed=pushed,
        finals=finals,
    )


def test_after_batch_caches_rescores_counts_notes_pushes_and_records_once(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """campaign_after_batch.lua applies a batch in one call: the answers cached, messages
    re-scored, checks and failures counted, pushes noted ('p:<id>', kept until the outcome),
    each outcome recorded once (counted in the campaign hash, noted unsent), the chain's
    batch forgotten."""
    now = time.time()
    due, checks = keys.campaign_due(CAMPAIGN), keys.campaign_checks(CAMPAIGN)
    meta, claimed = keys.campaign(CAMPAIGN), keys.campaign_claimed(CAMPAIGN, 0)
    redis_client.zadd(due, {"a": now + 60, "b": now + 60, "c": now + 60, "d": now + 60})
    redis_client.hset(checks, mapping={"a": 1, "f:a": 2, "d": 4, "f:d": 1, "p:d": 1})
    redis_client.hset(meta, mapping={"tick:0": "r:1", "done": 0})
    redis_client.sadd(claimed, "a", "b", "c", "d")
    cache = StatusCache(redis_client, settings, keys)
    processing = MessageStatus.model_validate({"deliverystatus": "processing"})
    reply = _after(
        redis_client,
        keys,
        stores={keys.status("a"): cache.store_args(processing)},
        rescored={"a": now + 5, "b": now + 1, "c": now + 50},
        counted=["a"],
        failed=["b"],
        pushed=["c"],
        finals=[Final("d", "delivered", '{"o":"delivered","t":1.5}')],
    )
    assert reply.recorded == ["d"]
    assert (reply.left, reply.first_due, reply.paused) == (3, pytest.approx(now + 1), False)
    entry = CachedStatus.from_json(redis_client.get(keys.status("a")))
    assert entry.status.deliverystatus == "processing"
    assert redis_client.zrange(due, 0, -1) == ["b", "a", "c"]
    assert redis_client.hgetall(checks) == {"a": "2", "f:b": "1", "p:c": "1"}
    assert redis_client.hgetall(keys.campaign_outcomes(CAMPAIGN)) == {
        "d": '{"o":"delivered","t":1.5}'
    }
    assert 0 < redis_client.pttl(keys.campaign_outcomes(CAMPAIGN)) <= 60_000
    assert redis_client.hmget(meta, ["done", "n:delivered"]) == ["1", "1"]
    assert redis_client.hgetall(keys.campaign_unsent(CAMPAIGN)) == {"d": "1700000000000"}
    assert not redis_client.exists(claimed)
    # Recorded once: the same outcome again records nothing; a 429 pauses every caller.
    redis_client.sadd(claimed, "b")
    reply = _after(
        redis_client,
        keys,
        run="r:0",  # taken over: the noted batch is the new run's
        pause_ms=1000,
        finals=[Final("d", "delivered", "{}")],
    )
    assert (reply.recorded, reply.left, reply.paused) == ([], 3, True)
    assert redis_client.hget(meta, "done") == "1"
    assert redis_client.exists(keys.rate_pause())
    assert redis_client.smembers(claimed) == {"b"}


def test_take_unsent_takes_a_callback_only_with_the_stamp_read(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """campaign_take_unsent.lua re-stamps a callback taken with the stamp its sender read;
    another stamp (another tick took it since) takes nothing."""
    unsent = keys.campaign_unsent(CAMPAIGN)
    redis_client.hset(unsent, "m", "100")
    take = TakeUnsent(redis_client)
    assert take(unsent_key=unsent, message_id="m", stamp="99", new_stamp=200) is (
        TakeUnsentCode.GONE
    )
    assert redis_client.hget(unsent, "m") == "100"
    assert take(unsent_key=unsent, message_id="m", stamp="100", new_stamp=200) is (
        TakeUnsentCode.TAKEN
    )
    assert redis_client.hget(unsent, "m") == "200"


def test_tick_next_moves_only_the_current_run_on(redis_client: redis.Redis, keys: Keys) -> None:
    """campaign_tick_next.lua moves the chain to its next run and re-scores it in the due
    index; a run taken over changes nothing."""
    meta = keys.campaign(CAMPAIGN)
    redis_client.hset(meta, "tick:0", "r:2")
    tick_next = TickNext(redis_client)

    def move(run: str) -> TickNextCode:
        return tick_next(
            meta_key=meta,
            due_index=keys.due(),
            chain_field="tick:0",
            run=run,
            next_run="r:3",
            member=Keys.due_tick(CAMPAIGN, 0),
            next_due=1234.5,
        )

    assert move("r:1") is TickNextCode.TAKEN_OVER
    assert redis_client.hget(meta, "tick:0") == "r:2"
    assert redis_client.zcard(keys.due()) == 0
    assert move("r:2") is TickNextCode.MOVED
    assert redis_client.hget(meta, "tick:0") == "r:3"
    assert redis_client.zscore(keys.due(), Keys.due_tick(CAMPAIGN, 0)) == 1234.5


def test_claim_report_claims_once_takes_over_a_stale_claim_and_retires_the_chains(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """campaign_claim_report.lua: the first caller claims the report; a fresh claim holds;
    a stale one is taken over; once sent and nothing is unsent, the chains leave the due
    index."""
    meta, unsent = keys.campaign(CAMPAIGN), keys.campaign_unsent(CAMPAIGN)
    members = [Keys.due_tick(CAMPAIGN, 0), Keys.due_tick(CAMPAIGN, 1)]
    redis_client.zadd(keys.due(), {members[0]: 1, members[1]: 2, "other": 3})
    claim = ClaimReport(redis_client)

    def at(now_ms: int) -> ClaimReportCode:
        return claim(
            meta_key=meta,
            unsent_key=unsent,
            due_index=keys.due(),
            now_ms=now_ms,
            stale_ms=1000,
            members=members,
        )

    assert at(10_000) is ClaimReportCode.CLAIMED
    assert redis_client.hget(meta, "report_sent") == "10000"
    assert at(10_500) is ClaimReportCode.HELD
    assert at(11_001) is ClaimReportCode.RECLAIMED
    assert redis_client.hget(meta, "report_sent") == "11001"
    redis_client.hset(meta, "report_sent", "sent")
    redis_client.hset(unsent, "m", "1")
    assert at(12_000) is ClaimReportCode.HELD  # a callback is still unsent
    assert redis_client.zcard(keys.due()) == 3
    redis_client.delete(unsent)
    assert at(12_000) is ClaimReportCode.RETIRED
    assert redis_client.zrange(keys.due(), 0, -1) == ["other"]
    assert redis_client.hget(meta, "report_sent") == "sent"
