"""Tests of smsbat_tracker.store.cache.StatusCache against a real Redis server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.seen import CachedStatus, HistoryEntry
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.keys import Keys

MID = "abc123def456"
STATUS_KEY = f"smsbat:status:{{{MID}}}"

EXTENDED = {
    "messagelistId": 123456,
    "messageId": MID,
    "deliverystatus": "delivered",
    "partscount": 2,
    "cost": 0.1,
    "fallbacks": [{"type": "sms", "status": "delivered", "attempt": 1}],
    "extendedStatuses": {"viber": "undeliverable", "sms": "delivered"},
    "rate": 0.05,
    "rateAmount": 0.05,
    "rateCurrency": "USD",
    "billAmount": 0.1,
    "billCurrency": "USD",
    "carrier": {"mcc": "255", "mnc": "01"},
    "tags": [],
    "meta": {},
}


def status(value: str, **fields: Any) -> MessageStatus:
    """A MessageStatus with ``deliverystatus=value``."""
    return MessageStatus.model_validate({"deliverystatus": value, **fields})


@pytest.fixture
def cache(redis_client: redis.Redis, settings: Settings) -> StatusCache:
    """A cache with the default TTLs (30 s in flight, one day final)."""
    return StatusCache(redis_client, settings)


def cached_status(cache: StatusCache) -> str:
    """The cached deliverystatus of MID (the test fails when nothing is cached)."""
    entry = cache.get(MID)
    assert entry is not None
    return entry.status.deliverystatus


def statuses(history: list[HistoryEntry]) -> list[str]:
    """The deliverystatus of each history entry."""
    return [entry.deliverystatus for entry in history]


def test_round_trip_keeps_the_extended_body(cache: StatusCache) -> None:
    """store then get returns the same body (extras, [] and {} included), source and times."""
    body = MessageStatus.model_validate(EXTENDED)
    assert cache.store(MID, body, source="push", observed_at=1_700_000_000.5, ts=1_699_999_999.0)
    entry = cache.get(MID)
    assert isinstance(entry, CachedStatus)
    assert entry.status == body
    assert entry.status.to_json_dict() == EXTENDED
    assert (entry.observed_at, entry.source, entry.ts) == (1_700_000_000.5, "push", 1_699_999_999.0)
    assert entry.is_final
    assert entry.age(now=1_700_000_010.5) == pytest.approx(10.0)
    assert entry.history == (HistoryEntry("delivered", 1_700_000_000.5, "push"),)


def test_poll_entry_has_no_provider_timestamp(cache: StatusCache) -> None:
    """A polled status is cached with source "poll" and ts None."""
    cache.store(MID, status("processing"), observed_at=1_700_000_000.0)
    entry = cache.get(MID)
    assert entry is not None
    assert (entry.source, entry.ts, entry.is_final) == ("poll", None, False)


def test_missing_entry_is_none(cache: StatusCache) -> None:
    """get of a never-stored id is None and its history empty."""
    assert cache.get(MID) is None
    assert cache.history(MID) == []


def test_in_flight_ttl_is_cache_ttl(cache: StatusCache, redis_client: redis.Redis) -> None:
    """A non-final status lives about cache_ttl (30 s by default)."""
    cache.store(MID, status("processing"))
    assert 29_000 < redis_client.pttl(STATUS_KEY) <= 30_000


def test_final_ttl_is_final_ttl(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """TTLs come from the settings: cache_ttl in flight, then final_ttl once final."""
    cache = StatusCache(redis_client, make_settings(cache_ttl=5.0, final_ttl=600.0))
    cache.store(MID, status("processing"))
    assert 4_000 < redis_client.pttl(STATUS_KEY) <= 5_000
    cache.store(MID, status("undeliverable"))
    assert 599_000 < redis_client.pttl(STATUS_KEY) <= 600_000


def test_default_final_ttl_is_a_day(cache: StatusCache, redis_client: redis.Redis) -> None:
    """A final status lives about final_ttl (one day by default)."""
    cache.store(MID, status("delivered"))
    assert 86_399_000 < redis_client.pttl(STATUS_KEY) <= 86_400_000


@pytest.mark.parametrize("later", ["processing", "scheduled", "undeliverable", "delivered"])
@pytest.mark.parametrize("source", ["poll", "push"])
def test_final_is_never_overwritten(cache: StatusCache, later: str, source: Any) -> None:
    """Once final, neither a newer non-final nor another final replaces the entry."""
    now = time.time()
    assert cache.store(MID, status("delivered", cost=0.05), observed_at=now)
    assert not cache.store(MID, status(later), source=source, observed_at=now + 5, ts=now + 5)
    entry = cache.get(MID)
    assert entry is not None
    assert entry.status.to_json_dict() == {"deliverystatus": "delivered", "cost": 0.05}
    assert statuses(cache.history(MID)) == ["delivered"]


def test_older_push_does_not_overwrite_newer_push(cache: StatusCache) -> None:
    """A late push (older provider timestamp) is dropped when a newer push is cached."""
    now = time.time()
    assert cache.store(MID, status("processing"), source="push", ts=now)
    assert not cache.store(MID, status("scheduled"), source="push", ts=now - 30)
    assert cached_status(cache) == "processing"


@pytest.mark.parametrize("late_source", ["push", "poll"])
def test_older_status_does_not_overwrite_newer_poll(cache: StatusCache, late_source: Any) -> None:
    """A status older than a cached poll's observation (late push, slow poll) is dropped."""
    now = time.time()
    assert cache.store(MID, status("processing"), source="poll", observed_at=now)
    late = now - 30
    stored = cache.store(MID, status("scheduled"), source=late_source, observed_at=late, ts=late)
    assert not stored
    assert cached_status(cache) == "processing"


def test_newer_status_replaces_older(cache: StatusCache) -> None:
    """A non-final status newer than the cached one replaces it."""
    now = time.time()
    assert cache.store(MID, status("scheduled"), source="push", ts=now - 10)
    assert cache.store(MID, status("processing"), source="push", ts=now)
    assert cached_status(cache) == "processing"


@pytest.mark.parametrize("source", ["poll", "push"])
def test_final_older_than_cached_non_final_still_wins(cache: StatusCache, source: Any) -> None:
    """A final status is stored even when its timestamp is older than the cached non-final."""
    now = time.time()
    assert cache.store(MID, status("processing"), source="push", ts=now)
    assert cache.store(MID, status("delivered"), source=source, observed_at=now - 60, ts=now - 60)
    assert cached_status(cache) == "delivered"


def test_history_appends_only_on_change(cache: StatusCache) -> None:
    """Repeated statuses add no history entries; each change adds one, oldest first."""
    base = time.time()
    sequence = ["scheduled", "scheduled", "processing", "processing", "processing", "delivered"]
    for offset, value in enumerate(sequence):
        cache.store(MID, status(value), observed_at=base + offset)
    history = cache.history(MID)
    assert statuses(history) == ["scheduled", "processing", "delivered"]
    assert [h.source for h in history] == ["poll", "poll", "poll"]
    assert [h.observed_at for h in history] == pytest.approx([base, base + 2, base + 5], abs=2e-3)


def test_history_is_capped(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Only the newest history_length changes are kept."""
    cache = StatusCache(redis_client, make_settings(history_length=3))
    base = time.time()
    for offset, value in enumerate(["s1", "s2", "s3", "s4", "s5", "s6"]):
        cache.store(MID, status(value), source="push", ts=base + offset)
    assert statuses(cache.history(MID)) == ["s4", "s5", "s6"]


def test_refused_store_adds_no_history(cache: StatusCache) -> None:
    """A store refused because the entry is final or newer leaves the history alone."""
    now = time.time()
    cache.store(MID, status("processing"), source="push", ts=now)
    cache.store(MID, status("scheduled"), source="push", ts=now - 5)  # late: refused
    cache.store(MID, status("delivered"), source="push", ts=now + 1)
    cache.store(MID, status("undeliverable"), source="push", ts=now + 2)  # final: refused
    assert statuses(cache.history(MID)) == ["processing", "delivered"]


def test_history_mixes_sources(cache: StatusCache) -> None:
    """History entries record whether each change was polled or pushed."""
    now = time.time()
    cache.store(MID, status("processing"), source="poll", observed_at=now)
    cache.store(MID, status("delivered"), source="push", observed_at=now + 1, ts=now + 1)
    assert [(h.deliverystatus, h.source) for h in cache.history(MID)] == [
        ("processing", "poll"),
        ("delivered", "push"),
    ]


# ------------------------------------------------------------------- damaged entries


def _body_key(entry: dict[str, Any]) -> str:
    return next(k for k, v in entry.items() if isinstance(v, dict) and "deliverystatus" in v)


def _time_key(entry: dict[str, Any], observed: float) -> str:
    return next(k for k, v in entry.items() if v == observed and not isinstance(v, bool))


def _drop(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


# Each damage is applied to a real entry, so these cases follow the entry format.
DAMAGES: dict[str, Callable[[dict[str, Any], float], object]] = {
    "body-missing": lambda e, o: _drop(_body_key(e), e),
    "body-list": lambda e, o: {**e, _body_key(e): []},
    "body-without-status": lambda e, o: {**e, _body_key(e): {"cost": 1}},
    "body-status-null": lambda e, o: {**e, _body_key(e): {"deliverystatus": None}},
    "time-missing": lambda e, o: _drop(_time_key(e, o), e),
    "time-text": lambda e, o: {**e, _time_key(e, o): "yesterday"},
    "list": lambda e, o: [e],
    "string": lambda e, o: "delivered",
    "null": lambda e, o: None,
    "number": lambda e, o: 5,
}
RAW_DAMAGES = ["not json", "", "{", '{"deliverystatus": "delivered"}']
NOT_UTF8 = pytest.param(
    b"\xff\xfe\x00garbage",
    id="not-utf8",
)


def damaged(cache: StatusCache, redis_client: redis.Redis, damage: str) -> str:
    """Store a valid entry, then overwrite it with the named damage; returns the raw text."""
    observed = 1_700_000_000.5
    cache.store(MID, status("processing"), observed_at=observed)
    entry = json.loads(redis_client.get(STATUS_KEY))
    raw = json.dumps(DAMAGES[damage](entry, observed))
    redis_client.set(STATUS_KEY, raw)
    return raw


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_entry_reads_as_a_miss(
    cache: StatusCache, redis_client: redis.Redis, damage: str
) -> None:
    """A well-formed entry with one part broken reads as None (and parse() says so too)."""
    raw = damaged(cache, redis_client, damage)
    assert cache.get(MID) is None
    assert StatusCache.parse(raw) is None
    assert cache.history(MID) == []


@pytest.mark.parametrize("raw", [*RAW_DAMAGES, NOT_UTF8])
def test_garbage_entry_reads_as_a_miss(
    cache: StatusCache, redis_client: redis.Redis, raw: str | bytes
) -> None:
    """An entry that is not a cache record at all reads as None."""
    redis_client.set(STATUS_KEY, raw)
    assert cache.get(MID) is None


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_store_replaces_a_damaged_entry(
    cache: StatusCache, redis_client: redis.Redis, damage: str
) -> None:
    """A store over a damaged entry succeeds and the new status reads back."""
    damaged(cache, redis_client, damage)
    assert cache.store(MID, status("delivered"))
    assert cached_status(cache) == "delivered"


@pytest.mark.parametrize("raw", [*RAW_DAMAGES, b"\xff\xfe\x00garbage"])
def test_store_replaces_a_garbage_entry(
    cache: StatusCache, redis_client: redis.Redis, raw: str | bytes
) -> None:
    """A store over an entry that is not JSON succeeds and the new status reads back."""
    redis_client.set(STATUS_KEY, raw)
    assert cache.store(MID, status("processing"))
    assert cached_status(cache) == "processing"


def test_keys_live_under_the_prefix(redis_client: redis.Redis, settings: Settings) -> None:
    """The entry is written under the given Keys prefix with the message's hash tag only."""
    cache = StatusCache(redis_client, settings, keys=Keys("tenant-a"))
    cache.store(MID, status("processing"))
    assert redis_client.keys("*") == [f"tenant-a:status:{{{MID}}}"]
    assert StatusCache(redis_client, settings).get(MID) is None


def test_store_on_a_pipeline(cache: StatusCache, redis_client: redis.Redis) -> None:
    """With pipe=, the write is queued and happens when the pipeline executes."""
    with redis_client.pipeline() as pipe:
        assert cache.store(MID, status("processing"), pipe=pipe)
        assert cache.get(MID) is None
        pipe.execute()
    assert cached_status(cache) == "processing"
