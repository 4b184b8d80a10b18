"""The status cache's and the rate limit's Lua scripts (store/lua/cache_*.lua and
ratelimit_*.lua), each run through its typed wrapper on the test Redis: what each returns
and what Redis holds after."""

from __future__ import annotations

import json
import re
from uuid import uuid4

import pytest
import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.store.cache import StatusCache, StoreStatus
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import PAUSE_SPACING, Pause, RateLimiter, Reserve
from smsbat_tracker.store.scripts import source


@pytest.fixture
def keys() -> Keys:
    """Keys under a prefix of this test's own."""
    return Keys(f"t{uuid4().hex[:8]}")


def test_store_status_keeps_the_newest_word(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """A status is stored with its history and the in-flight TTL; an older one is refused;
    a final one is stored with the final TTL and never replaced."""
    cache = StatusCache(redis_client, settings, keys)
    store = StoreStatus(redis_client)
    key = keys.status("m1")

    def args(value: str, ts: float) -> list[object]:
        status = MessageStatus.model_validate({"deliverystatus": value})
        return cache.store_args(status, source="push", observed_at=ts, ts=ts)

    assert store(key, args("processing", 100.0))
    entry = json.loads(str(redis_client.get(key)))
    assert (entry["b"]["deliverystatus"], entry["s"], entry["ts"], entry["f"]) == (
        "processing",
        "push",
        100.0,
        0,
    )
    assert 0 < redis_client.pttl(key) <= settings.cache_ttl * 1000
    assert not store(key, args("scheduled", 50.0))  # older: refused
    assert store(key, args("delivered", 90.0))  # final: wins although older
    assert redis_client.pttl(key) > settings.cache_ttl * 1000
    assert not store(key, args("undeliverable", 200.0))  # final already
    history = json.loads(str(redis_client.get(key)))["h"]
    assert [h[0] for h in history] == ["processing", "delivered"]


def test_reserve_books_tokens_and_queues_a_turned_away_waiter(
    redis_client: redis.Redis, keys: Keys, settings: Settings
) -> None:
    """The first token is booked at once (the bucket moves on by one interval); the next
    one, past the burst, is refused with the wait, and a named waiter takes its place in
    the line."""
    limiter = RateLimiter(redis_client, settings, keys, rate=1, burst=1)
    reserve = Reserve(redis_client)
    booked, wait_us = reserve(limiter.keys, limiter.script_args(1, ahead=0.0))
    assert (booked, wait_us) == (True, 0)
    assert redis_client.exists(keys.rate_limit())
    booked, wait_us = reserve(limiter.keys, limiter.script_args(1, ahead=0.0, waiter="w1"))
    assert not booked
    assert 0 < wait_us <= 1_000_000
    assert redis_client.zrange(keys.rate_waiters(), 0, -1) == ["w1"]
    assert redis_client.zrange(keys.rate_waiters_back(), 0, -1) == ["w1"]


def test_pause_stops_everyone_at_most_once_per_spacing(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A pause sets the pause key for PAUSE_SPACING times its length; another pause within
    that time is refused."""
    pause = Pause(redis_client)
    assert pause(keys.rate_limit(), keys.rate_pause(), 500)
    assert 1_500 < redis_client.pttl(keys.rate_pause()) <= PAUSE_SPACING * 500
    assert not pause(keys.rate_limit(), keys.rate_pause(), 500)
    assert not pause(keys.rate_limit(), keys.rate_pause(), 0)


def test_adjust_spacing_is_pause_spacing() -> None:
    """lib/adjust.lua's SPACING is store.ratelimit.PAUSE_SPACING."""
    spacing = re.search(r"^local SPACING = (\d+)$", source("lib/adjust.lua"), re.MULTILINE)
    assert spacing is not None
    assert int(spacing.group(1)) == PAUSE_SPACING
