"""The Redis TTL cache of message statuses, each with its compact history.

Polled and pushed statuses go through :meth:`StatusCache.store`, one Lua script that keeps
the newest word: a final status is never replaced, and a status older than the cached one
(pushes arrive late, twice, out of order) is dropped.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.provider.models import MessageStatus, is_final
from smsbat_tracker.rules.seen import CachedStatus, HistoryEntry, Source
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.scripts import Script

__all__ = ["StatusCache", "StoreStatus"]


class StoreStatus(Script):
    """``cache_store.lua``: cache a status unless the cached one is final or newer."""

    file = "cache_store.lua"

    def __call__(
        self,
        status_key: str,
        args: list[Any],
        *,
        client: redis.client.Pipeline | None = None,
        outcome_key: str | None = None,
    ) -> bool:
        keys = [status_key] if outcome_key is None else [status_key, outcome_key]
        return bool(self.run(keys, args, client=client))


class StatusCache:
    """Statuses per message in Redis, with TTLs from the settings.

    One key per message holds the last status body and its recent changes (the history):
    a few hundred bytes, kept ``SMSBAT_CACHE_TTL`` while in flight and ``SMSBAT_FINAL_TTL``
    once final.
    """

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> None:
        self._redis = client
        self._keys = keys or Keys(settings.key_prefix)
        self._ttl_ms = int(settings.cache_ttl * 1000)
        self._final_ttl_ms = int(settings.final_ttl * 1000)
        self._history_length = settings.history_length
        self._store = StoreStatus(client)

    def get(self, message_id: str) -> CachedStatus | None:
        """The cached status, or None when absent or expired."""
        try:
            raw = self._redis.get(self._keys.status(message_id))
        except UnicodeDecodeError:  # written by something else; as good as a miss
            return None
        if raw is None:
            return None
        return self.parse(raw)

    @staticmethod
    def parse(raw: str | bytes) -> CachedStatus | None:
        """A raw entry as a :class:`CachedStatus`; a damaged entry is as good as a miss."""
        try:
            return CachedStatus.from_json(raw)
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    def store(
        self,
        message_id: str,
        status: MessageStatus,
        *,
        source: Source = "poll",
        observed_at: float | None = None,
        ts: float | None = None,
        pipe: redis.client.Pipeline | None = None,
        unless_finished: bool = False,
    ) -> bool:
        """Cache a status unless the cached one is final or newer (or, ``unless_finished``,
        the message's outcome is recorded: a push after its tracking ended); True when
        stored.

        With ``pipe`` the write is queued on that pipeline and True is returned at once.
        """
        stored = self._store(
            self._keys.status(message_id),
            self.store_args(status, source=source, observed_at=observed_at, ts=ts),
            client=pipe,
            outcome_key=self._keys.outcome(message_id) if unless_finished else None,
        )
        return True if pipe is not None else bool(stored)

    def store_args(
        self,
        status: MessageStatus,
        *,
        source: Source = "poll",
        observed_at: float | None = None,
        ts: float | None = None,
    ) -> list[Any]:
        """The ARGV of ``cache_store.lua`` (and ``store(K, A)``'s A, lua/lib/status.lua, which
        the scripts that store a status with other work include), in order."""
        observed = time.time() if observed_at is None else observed_at
        return [
            json.dumps(status.to_json_dict(), separators=(",", ":")),
            "1" if is_final(status.deliverystatus) else "0",
            repr(ts if ts is not None else observed),
            self._ttl_ms,
            self._final_ttl_ms,
            repr(round(observed, 3)),
            source,
            repr(ts) if ts is not None else "",
            self._history_length,
            status.deliverystatus,
        ]

    def history(self, message_id: str) -> list[HistoryEntry]:
        """The message's recent status changes, oldest first (empty once expired)."""
        cached = self.get(message_id)
        return list(cached.history) if cached else []
