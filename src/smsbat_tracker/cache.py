"""The Redis TTL cache of message statuses, each with its compact history.

Polled and pushed statuses go through :meth:`StatusCache.store`, one Lua script that keeps
the newest word: a final status is never replaced, and a status older than the cached one
(pushes arrive late, twice, out of order) is dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.keys import Keys
from smsbat_tracker.models import MessageStatus, is_final

__all__ = ["STORE_LUA", "CachedStatus", "HistoryEntry", "StatusCache"]

Source = Literal["poll", "push"]

# ``store(K, A)``: K[1] is the status key; A: body JSON, final (0/1), time (ts or observed),
# in-flight TTL ms, final TTL ms, observed_at, source, ts or '', history length,
# deliverystatus (StatusCache.store_args).  Returns 1 when stored, 0 when the cached entry
# is final or newer. The entry is built by concatenation so the provider's body is stored
# byte for byte (cjson would turn [] into {}). A function, so that the tracking engine's
# after-check script stores in the same round trip.
STORE_LUA: Final = """
local function store(K, A)
  local old = redis.call('GET', K[1])
  local new_final = A[2] == '1'
  local history = {}
  local last_status = nil
  if old then
    local ok, e = pcall(cjson.decode, old)
    if ok and type(e) == 'table' then
      if e['f'] == 1 then return 0 end
      local old_time = tonumber(e['ts']) or tonumber(e['o']) or 0
      if (not new_final) and old_time > tonumber(A[3]) then return 0 end
      if type(e['h']) == 'table' then history = e['h'] end
      if type(e['b']) == 'table' then last_status = e['b']['deliverystatus'] end
    end
  end
  if last_status ~= A[10] then
    history[#history + 1] = {A[10], tonumber(A[6]), A[7]}
    while #history > tonumber(A[9]) do table.remove(history, 1) end
  end
  local ts = A[8] == '' and 'null' or A[8]
  local entry = '{"b":' .. A[1] .. ',"o":' .. A[6] .. ',"s":"' .. A[7] .. '","ts":' .. ts
    .. ',"f":' .. (new_final and '1' or '0') .. ',"h":' .. cjson.encode(history) .. '}'
  redis.call('SET', K[1], entry, 'PX', new_final and A[5] or A[4])
  return 1
end
"""
_STORE = STORE_LUA + "return store(KEYS, ARGV)\n"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One status change of a message."""

    deliverystatus: str
    observed_at: float
    source: str


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """A status as the cache holds it, with the message's recent status changes."""

    status: MessageStatus
    observed_at: float
    source: Source
    ts: float | None = None  # the provider's own timestamp, for pushes
    history: tuple[HistoryEntry, ...] = ()

    @property
    def is_final(self) -> bool:
        """Whether the cached status is final."""
        return self.status.is_final

    def age(self, now: float | None = None) -> float:
        """Seconds since the status was observed."""
        return (time.time() if now is None else now) - self.observed_at

    @classmethod
    def from_json(cls, raw: str | bytes) -> CachedStatus:
        """Parse a cache entry: ``{"b": body, "o": observed_at, "s": source, "ts", "f", "h"}``."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            status=MessageStatus.model_validate(data["b"]),
            observed_at=float(data["o"]),
            source=data.get("s", "poll"),
            ts=data.get("ts"),
            history=tuple(
                HistoryEntry(str(h[0]), float(h[1]), str(h[2])) for h in data.get("h") or ()
            ),
        )


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
        self._store = client.register_script(_STORE)

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
    ) -> bool:
        """Cache a status unless the cached one is final or newer; True when stored.

        With ``pipe`` the write is queued on that pipeline and True is returned at once.
        """
        stored = self._store(
            keys=[self._keys.status(message_id)],
            args=self.store_args(status, source=source, observed_at=observed_at, ts=ts),
            client=pipe,
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
        """The arguments :data:`STORE_LUA`'s ``store(K, A)`` takes, in order."""
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
