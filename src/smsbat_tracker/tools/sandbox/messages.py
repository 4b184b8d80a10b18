"""One simulated message: its timeline of statuses, what it answers when, what happened to it.

A status is computed from the timeline when asked (no timer runs per message). Also the
validation of scripted messages, as given to :meth:`SandboxState.create_scripted` or
``POST /sandbox/messages``.
"""

from __future__ import annotations

import bisect
import json
import math
from typing import Any

from smsbat_tracker.tools.sandbox.config import is_number

__all__ = ["FINAL_STATUSES", "Message", "parse_scripted", "parse_timeline"]

FINAL_STATUSES: frozenset[str] = frozenset({"delivered", "undeliverable", "permanenterror"})
"""Statuses after which a message never changes again."""


class Message:
    """One message: its planned timeline (absolute epochs) and what happened to it."""

    __slots__ = (
        "cost",
        "created_at",
        "extended",
        "fallback",
        "final_at",
        "final_status",
        "list_id",
        "message_id",
        "partscount",
        "poll_times",
        "pushes",
        "statuses",
        "times",
    )

    def __init__(
        self,
        message_id: str,
        list_id: int,
        created_at: float,
        timeline: list[tuple[str, float]],
        cost: float,
        partscount: int,
        extended: dict[str, object] | None,
        fallback: bool,
    ) -> None:
        self.message_id = message_id
        self.list_id = list_id
        self.created_at = created_at
        self.statuses = [status for status, _ in timeline]
        self.times = [created_at + offset for _, offset in timeline]
        self.cost = cost
        self.partscount = partscount
        self.extended = extended
        self.fallback = fallback
        last = self.statuses[-1]
        self.final_status: str | None = last if last in FINAL_STATUSES else None
        self.final_at: float | None = self.times[-1] if self.final_status is not None else None
        self.poll_times: list[float] = []
        self.pushes: list[dict[str, object]] = []

    def status_at(self, now: float) -> str:
        """The status as of ``now``: the last timeline entry already reached."""
        index = bisect.bisect_right(self.times, now) - 1
        # Before the first entry is reached the message is simply queued.
        return self.statuses[index] if index >= 0 else "scheduled"

    def changes(self) -> list[tuple[str, float]]:
        """Status changes after creation, as (status, epoch): what the webhook reports."""
        result: list[tuple[str, float]] = []
        previous = self.status_at(self.created_at)
        for status, at in zip(self.statuses, self.times, strict=True):
            if at > self.created_at and status != previous:
                result.append((status, at))
            if at > self.created_at:
                previous = status
        return result

    def body(self, now: float) -> dict[str, object]:
        """The ``GET /bat/message/{id}`` answer as of ``now``."""
        status = self.status_at(now)
        if status == "scheduled":
            # Early states omit fields, as the real API does.
            return {"deliverystatus": "scheduled", "partscount": self.partscount}
        delivered = status == "delivered"
        cost = self.cost if delivered else 0.0
        body: dict[str, object] = {
            "messagelistId": self.list_id,
            "messageId": self.message_id,
            "deliverystatus": status,
            "partscount": self.partscount,
            "cost": cost,
        }
        if self.extended is not None:
            if self.fallback and delivered:
                viber, sms = "undeliverable", "delivered"
            else:
                viber, sms = status, "not_used"
            rate = round(self.cost / self.partscount, 6)
            body["fallbacks"] = [{"type": "sms", "status": sms}]
            body["extendedStatuses"] = {"viber": viber, "sms": sms}
            body["rate"] = rate
            body["rateAmount"] = rate
            body["rateCurrency"] = "USD"
            body["billAmount"] = cost
            body["billCurrency"] = "USD"
            body.update(self.extended)
        return body

    def truth(self, now: float) -> dict[str, Any]:
        """Ground truth of the message, for tests and benchmarks."""
        return {
            "messageId": self.message_id,
            "messagelistId": self.list_id,
            "created_at": self.created_at,
            "final_status": self.final_status,
            "final_at": self.final_at,
            "status": self.status_at(now),
            "fallback": self.fallback,
            "timeline": [[s, t] for s, t in zip(self.statuses, self.times, strict=True)],
            "polls": len(self.poll_times),
            "poll_times": list(self.poll_times),
            "pushes": [dict(push) for push in self.pushes],
        }


def parse_timeline(value: object) -> list[tuple[str, float]]:
    """``[[status, seconds from now], ...]``, checked: non-empty, in time order."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("timeline must be a non-empty list of [status, seconds] pairs")
    timeline: list[tuple[str, float]] = []
    previous = 0.0
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError("timeline entries must be [status, seconds] pairs")
        status, offset = entry
        if not isinstance(status, str) or not status:
            raise ValueError("timeline status must be a non-empty string")
        if not is_number(offset) or not 0.0 <= offset < math.inf:
            raise ValueError("timeline seconds must be finite numbers >= 0")
        if offset < previous:
            raise ValueError("timeline seconds must not decrease")
        previous = float(offset)
        timeline.append((status, previous))
    return timeline


def parse_scripted(item: object) -> dict[str, Any]:
    """One scripted message (``timeline``, ``messageId``, ``cost``, ``partscount``,
    ``extended``), checked and with defaults filled in; ValueError when invalid."""
    if not isinstance(item, dict):
        raise ValueError("each scripted message must be an object")
    message_id = item.get("messageId")
    if message_id is not None and (not isinstance(message_id, str) or not message_id):
        raise ValueError("messageId must be a non-empty string")
    cost = item.get("cost", 0.05)
    if cost is None:
        cost = 0.05
    if not is_number(cost) or not 0.0 <= cost < math.inf:
        raise ValueError("cost must be a number >= 0")
    partscount = item.get("partscount", 1)
    if partscount is None:
        partscount = 1
    if not isinstance(partscount, int) or isinstance(partscount, bool) or partscount < 1:
        raise ValueError("partscount must be an integer >= 1")
    extended = item.get("extended")
    if extended is not None:
        if not isinstance(extended, dict):
            raise ValueError("extended must be an object")
        try:
            json.dumps(extended)
        except (TypeError, ValueError) as exc:
            raise ValueError("extended must be JSON-serialisable") from exc
    return {
        "timeline": parse_timeline(item.get("timeline")),
        "messageId": message_id,
        "cost": float(cost),
        "partscount": partscount,
        "extended": extended,
    }
