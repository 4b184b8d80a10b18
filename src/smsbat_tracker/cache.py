"""The Redis TTL cache of message statuses, and each message's compact history.

Polled and pushed statuses go through :meth:`StatusCache.store`, one Lua script that keeps
the newest word: a final status is never replaced, and a status older than the cached one
(pushes arrive late, twice, out of order) is dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.keys import Keys
from smsbat_tracker.models import MessageStatus, is_final

__all__ = ["CachedStatus", "HistoryEntry", "StatusCache"]

Source = Literal["poll", "push"]

# KEYS: status, history.  ARGV: entry JSON, final (0/1), time, in-flight TTL ms, final TTL ms,
# history entry, history length, status.
# Returns 1 when stored, 0 when the cached entry is final or newer.
_STORE = """
local old = redis.call('GET', KEYS[1])
local new_final = ARGV[2] == '1'
local new_time = tonumber(ARGV[3])
local last_status = nil
if old then
  local ok, e = pcall(cjson.decode, old)
  if ok then
    if e['final'] then return 0 end
    local old_time = tonumber(e['ts'] or e['observed_at']) or 0
    if (not new_final) and old_time > new_time then return 0 end
    last_status = e['deliverystatus']
  end
end
local ttl = new_final and ARGV[5] or ARGV[4]
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
if last_status ~= ARGV[8] then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """A status as the cache holds it."""

    status: MessageStatus
    observed_at: float
    source: Source
    ts: float | None = None  # the provider's own timestamp, for pushes

    @property
    def is_final(self) -> bool:
        """Whether the cached status is final."""
        return self.status.is_final

    def age(self, now: float | None = None) -> float:
        """Seconds since the status was observed."""
        return (time.time() if now is None else now) - self.observed_at

    def to_json(self) -> str:
        """The cache entry's JSON."""
        return json.dumps(
            {
                "deliverystatus": self.status.deliverystatus,
                "final": self.is_final,
                "observed_at": self.observed_at,
                "source": self.source,
                "ts": self.ts,
                "body": self.status.to_json_dict(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> CachedStatus:
        """Parse a cache entry."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            status=MessageStatus.model_validate(data["body"]),
            observed_at=float(data["observed_at"]),
            source=data.get("source", "poll"),
            ts=data.get("ts"),
        )


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a message's history."""

    deliverystatus: str
    observed_at: float
    source: str


class StatusCache:
    """Statuses per message in Redis, with TTLs from the settings."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> None:
        self._redis = client
        self._keys = keys or Keys(settings.key_prefix)
        self._ttl_ms = int(settings.cache_ttl * 1000)
        self._final_ttl_ms = int(settings.final_ttl * 1000)
        self._history_length = settings.history_length
        self._store = client.register_script(_STORE)

    def get(self, message_id: str) -> CachedStatus | None:
        """The cached status, or None when absent or expired."""
        raw = self._redis.get(self._keys.status(message_id))
        if raw is None:
            return None
        try:
            return CachedStatus.from_json(raw)
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is as good as a miss

    def store(
        self,
        message_id: str,
        status: MessageStatus,
        *,
        source: Source = "poll",
        observed_at: float | None = None,
        ts: float | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> bool:
        """Cache a status unless the cached one is final or newer; True when stored.

        With ``pipe`` the write is queued on that pipeline and True is returned at once.
        """
        entry = CachedStatus(
            status=status,
            observed_at=time.time() if observed_at is None else observed_at,
            source=source,
            ts=ts,
        )
        when = entry.ts if entry.ts is not None else entry.observed_at
        line = f"{status.deliverystatus} {entry.observed_at:.3f} {source}"
        stored = self._store(
            keys=[self._keys.status(message_id), self._keys.history(message_id)],
            args=[
                entry.to_json(),
                "1" if is_final(status.deliverystatus) else "0",
                repr(when),
                self._ttl_ms,
                self._final_ttl_ms,
                line,
                self._history_length,
                status.deliverystatus,
            ],
            client=pipe,
        )
        return True if pipe is not None else bool(stored)

    def history(self, message_id: str) -> list[HistoryEntry]:
        """The message's status changes, oldest first."""
        entries = []
        for raw in self._redis.lrange(self._keys.history(message_id), 0, -1):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            status, _, rest = text.partition(" ")
            observed, _, source = rest.partition(" ")
            entries.append(HistoryEntry(status, float(observed), source))
        return entries
