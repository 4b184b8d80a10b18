"""The re-driver's Lua scripts (store/lua/redrive_*.lua), each run through its typed wrapper
(store/redrive_scripts.py) on the test Redis: what each returns and what Redis holds after."""

from __future__ import annotations

from uuid import uuid4

import pytest
import redis

from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import (
    Beat,
    ClaimResend,
    Gone,
    HeldEntry,
    RefreshHeld,
    ReleaseBatch,
    Resend,
    SessionTake,
    Take,
    TakeChain,
    TakeSession,
    Unlock,
    Unlocked,
)

NOW = 1_000_000.0


@pytest.fixture
def keys() -> Keys:
    """Keys under a prefix of this test's own."""
    return Keys(f"t{uuid4().hex[:8]}")


def _session_entry(keys: Keys, message_id: str, owner: str, run: int) -> HeldEntry:
    return HeldEntry(
        Keys.due_message(message_id), keys.session(message_id), "owner", owner, str(run)
    )


def test_refresh_marks_alive_only_overdue_entries_whose_token_matches(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Held sessions and chains with their token are rescored now; stale tokens, runs and
    entries not yet due keep their score."""
    due = keys.due()
    for m, owner, run in (("a", "t-a", 2), ("b", "t-b", 0), ("c", "t-c", 1), ("d", "t-d", 0)):
        redis_client.hset(keys.session(m), mapping={"owner": owner, "run": run})
    redis_client.hset(keys.campaign("camp"), "tick:1", "run-1")
    redis_client.zadd(
        due,
        {"m:a": NOW - 30, "m:b": NOW - 30, "m:c": NOW - 30, "m:d": NOW + 30, "c:camp:1": NOW - 30},
    )
    entries = [
        _session_entry(keys, "a", "t-a", 2),  # held, overdue: refreshed
        _session_entry(keys, "b", "t-old", 0),  # a stale copy: another owner now
        _session_entry(keys, "c", "t-c", 0),  # the owner's stale run
        _session_entry(keys, "d", "t-d", 0),  # not overdue
        HeldEntry(Keys.due_tick("camp", 1), keys.campaign("camp"), "tick:1", "run-1", ""),
    ]
    assert RefreshHeld(redis_client)(due, NOW, entries) == 2
    assert redis_client.zscore(due, "m:a") == NOW
    assert redis_client.zscore(due, "c:camp:1") == NOW
    assert redis_client.zscore(due, "m:b") == NOW - 30
    assert redis_client.zscore(due, "m:c") == NOW - 30
    assert redis_client.zscore(due, "m:d") == NOW + 30
    assert RefreshHeld(redis_client)(due, NOW, []) == 0


def test_take_session_gives_a_lost_session_a_new_owner_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """An overdue session gets the new owner and run 0, counts a re-drive, and is due now;
    the take says when the lost run fell due (its place in the rate limit's line), or None
    for a session that does not say, and the lost run's task id; taken again it has moved;
    a session gone drops its entry."""
    due, session = keys.due(), keys.session("m1")
    redis_client.hset(
        session,
        mapping={"owner": "t-1", "run": 3, "started_at": 10, "deadline_at": 70, "due": 42.5},
    )
    redis_client.hset(
        keys.session("old"), mapping={"owner": "t-2", "run": 1, "started_at": 5, "deadline_at": 9}
    )
    redis_client.zadd(due, {"m:m1": NOW - 30, "m:gone": NOW - 30, "m:old": NOW - 30})
    take = TakeSession(redis_client)
    taken = take(due, session, "m:m1", NOW - 10, "t-new", NOW)
    assert taken == SessionTake(Take.TAKEN, 10.0, 70.0, 42.5, "t-1")
    assert redis_client.hgetall(session) == {
        "owner": "t-new",
        "run": "0",
        "started_at": "10",
        "deadline_at": "70",
        "due": "42.5",
        "redriven": "1",
    }
    old = take(due, keys.session("old"), "m:old", NOW - 10, "t-new2", NOW)
    assert old == SessionTake(Take.TAKEN, 5.0, 9.0, None, "t-2")
    assert redis_client.zscore(due, "m:m1") == NOW
    assert take(due, session, "m:m1", NOW - 10, "t-other", NOW) == SessionTake(Take.MOVED)
    assert redis_client.hget(session, "owner") == "t-new"
    assert take(due, keys.session("gone"), "m:gone", NOW - 10, "t-x", NOW).result == Take.GONE
    assert redis_client.zscore(due, "m:gone") is None
    assert not redis_client.exists(keys.session("gone"))


def test_take_chain_gives_a_lost_chain_a_new_run_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """An overdue chain gets the new run, counts a re-drive, and is due now; taken again it
    has moved; a campaign gone drops its entry."""
    due, meta = keys.due(), keys.campaign("camp")
    redis_client.hset(meta, mapping={"tick:0": "old:3", "total": 4})
    redis_client.zadd(due, {"c:camp:0": NOW - 30, "c:gone:0": NOW - 30})
    take = TakeChain(redis_client)
    assert take(due, meta, "c:camp:0", NOW - 10, "tick:0", "new:0", NOW) == Take.TAKEN
    assert redis_client.hgetall(meta) == {"tick:0": "new:0", "total": "4", "redriven": "1"}
    assert redis_client.zscore(due, "c:camp:0") == NOW
    assert take(due, meta, "c:camp:0", NOW - 10, "tick:0", "other:0", NOW) == Take.MOVED
    assert redis_client.hget(meta, "tick:0") == "new:0"
    gone = keys.campaign("gone")
    assert take(due, gone, "c:gone:0", NOW - 10, "tick:0", "x:0", NOW) == Take.GONE
    assert redis_client.zscore(due, "c:gone:0") is None


def test_release_batch_puts_back_each_message_when_it_fell_due(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """At most ``limit`` claimed messages a call are due again, the earliest first, each at
    the time it fell due (its place in the rate limit's line), not now; only those still
    in the due set; the count left goes down to 0."""
    campaign_due, claimed = keys.campaign_due("camp"), keys.campaign_claimed("camp", 0)
    fell_due = {f"m{i}": NOW - 10 + i for i in range(4)}
    redis_client.zadd(campaign_due, dict.fromkeys(["m0", "m1", "m2"], NOW + 60))  # m3 finished
    redis_client.zadd(claimed, fell_due)
    release = ReleaseBatch(redis_client)
    assert release(campaign_due, claimed, NOW, 3) == 1
    assert release(campaign_due, claimed, NOW, 3) == 0
    assert not redis_client.exists(claimed)
    assert redis_client.zrange(campaign_due, 0, -1, withscores=True) == [
        (m, fell_due[m]) for m in ("m0", "m1", "m2")
    ]


def test_release_batch_puts_back_a_bounded_part_a_call(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A batch noted as a plain set (by an older version: no due times) goes back due now,
    at most ``limit`` messages a call (only those still in the due set); the count left
    goes down to 0 and the claimed set is gone."""
    campaign_due, claimed = keys.campaign_due("camp"), keys.campaign_claimed("camp", 0)
    ids = [f"m{i}" for i in range(5)]
    redis_client.zadd(campaign_due, dict.fromkeys(ids[:4], NOW + 60))  # m4 finished meanwhile
    redis_client.sadd(claimed, *ids)
    release = ReleaseBatch(redis_client)
    assert release(campaign_due, claimed, NOW, 2) == 3
    assert release(campaign_due, claimed, NOW, 2) == 1
    assert release(campaign_due, claimed, NOW, 2) == 0
    assert not redis_client.exists(claimed)
    assert redis_client.zrange(campaign_due, 0, -1, withscores=True) == [(m, NOW) for m in ids[:4]]
    assert release(campaign_due, claimed, NOW, 2) == 0  # nothing claimed: nothing to do


def test_unlock_releases_only_the_holders_lock(redis_client: redis.Redis, keys: Keys) -> None:
    """The sweep lock goes only when this holder still holds it."""
    lock = keys.redrive_lock()
    unlock = Unlock(redis_client)
    redis_client.set(lock, "someone-else")
    assert unlock(lock, "me") == Unlocked.NOT_HELD
    assert redis_client.get(lock) == "someone-else"
    redis_client.set(lock, "me")
    assert unlock(lock, "me") == Unlocked.RELEASED
    assert not redis_client.exists(lock)
    assert unlock(lock, "me") == Unlocked.NOT_HELD


def test_a_resend_is_claimed_only_on_the_entry_the_sweep_read(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """The sweep sends a lost follow-up again only if its entry is still the one it read:
    a tracking run that sent it meanwhile wrote a fresh one, and wins."""
    claim = ClaimResend(redis_client)
    sends, index = keys.unreceived_sends(), keys.unreceived()
    redis_client.hset(sends, "f-1", '{"n": 0, "missing": 1}')
    assert (
        claim(sends, index, "f-1", read='{"n": 0, "missing": 1}', entry='{"n": 1}', now=NOW)
        == Resend.CLAIMED
    )
    assert redis_client.hget(sends, "f-1") == '{"n": 1}'
    assert redis_client.zscore(index, "f-1") == NOW
    # Sent meanwhile by a tracking run: its entry changed.
    assert (
        claim(sends, index, "f-1", read='{"n": 0, "missing": 1}', entry='{"n": 2}', now=NOW)
        == Resend.CHANGED
    )
    assert redis_client.hget(sends, "f-1") == '{"n": 1}'
    # Received meanwhile: its entry is gone.
    redis_client.hdel(sends, "f-1")
    assert claim(sends, index, "f-1", read='{"n": 1}', entry='{"n": 2}', now=NOW) == Resend.CHANGED
    assert not redis_client.hexists(sends, "f-1")


def test_beat_scores_the_holder_on_both_clocks_and_returns_its_previous_score(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A beat scores its holder by the worker's clock (holders) and, when its connections
    are named, by the server's (beats); it returns the score it found (None at first, 0
    once found gone). A beat with unnamed connections leaves no server-clock beat."""
    beat = Beat(redis_client)
    server = float(redis_client.time()[0])
    first = Beat.parse(beat(keys.holders(), keys.beats(), "w1", 100.0, named=True))
    assert first.previous is None
    assert server <= first.served < server + 5
    assert redis_client.zscore(keys.beats(), "w1") == pytest.approx(first.served)
    assert Beat.parse(beat(keys.holders(), keys.beats(), "w1", 101.0, named=True)).previous == 100.0
    redis_client.zadd(keys.holders(), {"w1": 0})
    assert Beat.parse(beat(keys.holders(), keys.beats(), "w1", 102.0, named=False)).previous == 0
    assert redis_client.zscore(keys.holders(), "w1") == 102.0
    assert redis_client.zscore(keys.beats(), "w1") is None


def test_gone_declares_only_named_holders_quiet_for_long_enough_since_the_outage(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Gone declares a candidate whose server-clock beat is at least gone_after old and no
    older than since: its holders score becomes 0 and its server-clock beat goes. A recent
    beat, one before since, a holder that retired (not in holders) or whose connections
    carry no name (no server-clock beat) are left alone."""
    now = float(redis_client.time()[0])
    redis_client.zadd(keys.holders(), dict.fromkeys(("quiet", "recent", "old", "unnamed"), 50.0))
    redis_client.zadd(
        keys.beats(), {"quiet": now - 5, "recent": now - 0.5, "old": now - 100, "retired": now - 5}
    )
    gone = Gone(redis_client)
    candidates = ["quiet", "recent", "old", "unnamed", "retired"]
    assert gone(keys.holders(), keys.beats(), candidates, 1.5, now - 50) == ["quiet"]
    assert redis_client.zscore(keys.holders(), "quiet") == 0
    assert redis_client.zscore(keys.beats(), "quiet") is None
    assert redis_client.zscore(keys.holders(), "recent") == 50.0
    assert redis_client.zscore(keys.holders(), "retired") is None
    assert gone(keys.holders(), keys.beats(), [], 1.5, 0.0) == []
