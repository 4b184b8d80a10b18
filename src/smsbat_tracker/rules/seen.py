"""What the tracker has seen of a message: a status, when and how it came, and its history."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from smsbat_tracker.provider.models import MessageStatus

__all__ = ["CachedStatus", "HistoryEntry", "Source"]

Source = Literal["poll", "push"]


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
