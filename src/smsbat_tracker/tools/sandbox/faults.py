"""Injected faults of the status route: random rates, per-message queues, and their checks."""

from __future__ import annotations

import collections
import math
import random
from typing import Any

from smsbat_tracker.tools.sandbox.config import is_number

__all__ = ["FAULT_KINDS", "Faults", "parse_faults"]

FAULT_KINDS: frozenset[str] = frozenset(
    {"500", "429", "malformed", "truncated", "slow", "401", "ok"}
)
"""Kinds accepted in the per-message fault queues (``message_faults``); ``"ok"`` answers
normally (to script a good answer between faults)."""


class Faults:
    """The fault settings of one sandbox; not locked itself: the state's lock guards it."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Every fault off, every per-message queue empty."""
        self.error_rate = 0.0
        self.rate_limit_rate = 0.0
        self.malformed_rate = 0.0
        self.slow_rate = 0.0
        self.retry_after = 1.0
        self.slow_seconds = 1.0
        self.random = False
        self.per_message: dict[str, collections.deque[str]] = {}

    def apply(self, settings: dict[str, Any]) -> None:
        """Take the settings of :func:`parse_faults`; omitted ones are kept.

        ValueError (and nothing changed) when the three answer-replacing rates sum past 1.
        """
        error = settings.get("error_rate", self.error_rate)
        limited = settings.get("rate_limit_rate", self.rate_limit_rate)
        malformed = settings.get("malformed_rate", self.malformed_rate)
        if error + limited + malformed > 1.0 + 1e-9:
            raise ValueError("error_rate + rate_limit_rate + malformed_rate must be <= 1")
        self.error_rate = error
        self.rate_limit_rate = limited
        self.malformed_rate = malformed
        self.slow_rate = settings.get("slow_rate", self.slow_rate)
        self.retry_after = settings.get("retry_after", self.retry_after)
        self.slow_seconds = settings.get("slow_seconds", self.slow_seconds)
        self.random = (error + limited + malformed + self.slow_rate) > 0.0
        for message_id, kinds in settings.get("message_faults", {}).items():
            self.per_message.setdefault(message_id, collections.deque()).extend(kinds)

    def next(self, message_id: str, rng: random.Random) -> str | None:
        """The fault of the next status answer for ``message_id``, or None for a good one.

        The message's queue comes first; only without one are the random rates drawn.
        """
        queue = self.per_message.get(message_id)
        if queue:
            fault = queue.popleft()
            if not queue:
                del self.per_message[message_id]
            return fault
        if self.random:
            return self._draw(rng)
        return None

    def _draw(self, rng: random.Random) -> str | None:
        draw = rng.random()
        if draw < self.error_rate:
            return "500"
        draw -= self.error_rate
        if draw < self.rate_limit_rate:
            return "429"
        draw -= self.rate_limit_rate
        if draw < self.malformed_rate:
            return "malformed"
        if self.slow_rate > 0.0 and rng.random() < self.slow_rate:
            return "slow"
        return None


def parse_faults(body: dict[str, Any]) -> dict[str, Any]:
    """Validate fault settings; keys whose value is None are left out (unchanged)."""
    settings: dict[str, Any] = {}
    for name in ("error_rate", "rate_limit_rate", "slow_rate", "malformed_rate"):
        value = body.get(name)
        if value is None:
            continue
        if not is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1]")
        settings[name] = float(value)
    for name in ("retry_after", "slow_seconds"):
        value = body.get(name)
        if value is None:
            continue
        if not is_number(value) or not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a number >= 0")
        settings[name] = float(value)
    message_faults = body.get("message_faults")
    if message_faults is not None:
        if not isinstance(message_faults, dict):
            raise ValueError("message_faults must be an object of id -> list of fault kinds")
        parsed: dict[str, list[str]] = {}
        for message_id, kinds in message_faults.items():
            if not isinstance(kinds, list | tuple) or not all(k in FAULT_KINDS for k in kinds):
                raise ValueError(f"message_faults kinds must be among {sorted(FAULT_KINDS)}")
            parsed[str(message_id)] = [str(kind) for kind in kinds]
        settings["message_faults"] = parsed
    return settings
