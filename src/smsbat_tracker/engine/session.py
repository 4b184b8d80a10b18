"""What a tracking is made of, as plain values: its session, its subscriptions, its result.

Per message, Redis holds (see :mod:`smsbat_tracker.store.keys`):

- a *session* hash (:class:`Session`): the owner task id (the one poller) and the run it
  expects next (with the owner, the fencing token), start and deadline, counters;
- *subscriptions* (:class:`Subscription`): each distinct set of callbacks (and captured
  chain) asking for the outcome; the same set enqueued twice is one subscription;
- the *outcome*: the result dict (:func:`build_result`), written once, then the ids of the
  subscriptions it served (:func:`parse_outcome` reads the result alone).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smsbat_tracker.provider.models import DELIVERED, MessageStatus
from smsbat_tracker.rules.decide import Outcome, Progress

__all__ = [
    "Session",
    "SettleResult",
    "Subscription",
    "build_result",
    "iso",
    "parse_outcome",
]


def parse_outcome(raw: str) -> dict[str, Any]:
    """A stored outcome's result (what follows its first line is bookkeeping: the ids of
    the subscriptions it served; see ``store/lua/lib/forget.lua``)."""
    result: dict[str, Any] = json.loads(raw.partition("\n")[0])
    return result


def iso(epoch: float | None) -> str | None:
    """ISO-8601 UTC text for an epoch time."""
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Session:
    """A message's tracking session as stored in Redis."""

    message_id: str
    owner: str
    started_at: float
    deadline_at: float
    checks: int = 0
    polls: int = 0
    pushed: bool = False  # a push has been seen for the message: the provider pushes it
    failures: int = 0  # requests failed in a row since the last answer
    # The owner's run (Celery's retries count) the session expects next: with ``owner``, the
    # fencing token. None for a session stored before the tracker had one.
    run: int | None = None
    # How many times its next run came, by kind of reason (RETRY_REASONS; none left out).
    retries: dict[str, int] = field(default_factory=dict)

    @property
    def progress(self) -> Progress:
        """What the rules (:func:`~smsbat_tracker.rules.decide.decide`) need of the session."""
        return Progress(self.started_at, self.deadline_at, self.checks, self.pushed, self.failures)


@dataclass(frozen=True, slots=True)
class Subscription:
    """Who wants a message's outcome: the callbacks of one ``track_message`` call.

    ``chain`` and ``links`` are the rest of a Celery chain and link callbacks taken from
    the task request, so that they too run once, with the final result.
    """

    on_delivered: dict[str, Any] | None = None
    on_failed: dict[str, Any] | None = None
    on_timeout: dict[str, Any] | None = None
    chain: list[dict[str, Any]] | None = None
    links: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON: equal subscriptions give equal text, hence equal ids."""
        return json.dumps(
            {
                "on_delivered": self.on_delivered,
                "on_failed": self.on_failed,
                "on_timeout": self.on_timeout,
                "chain": self.chain,
                "links": self.links,
                "extra": self.extra,
            },
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )

    @property
    def id(self) -> str:
        """Content hash of the subscription."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:24]

    @property
    def is_empty(self) -> bool:
        """True when nobody would be told anything."""
        return not (
            self.on_delivered or self.on_failed or self.on_timeout or self.chain or self.links
        )

    @classmethod
    def from_json(cls, raw: str) -> Subscription:
        """Parse :meth:`to_json` output."""
        data = json.loads(raw)
        return cls(
            on_delivered=data.get("on_delivered"),
            on_failed=data.get("on_failed"),
            on_timeout=data.get("on_timeout"),
            chain=data.get("chain"),
            links=data.get("links"),
            extra=data.get("extra") or {},
        )

    def callback_for(self, outcome: str) -> dict[str, Any] | None:
        """The callback an outcome selects."""
        if outcome == DELIVERED:
            return self.on_delivered
        if outcome == "timeout":
            return self.on_timeout
        return self.on_failed


@dataclass(frozen=True, slots=True)
class SettleResult:
    """What :meth:`~smsbat_tracker.engine.settle.Settler.settle` did."""

    recorded: bool
    result: dict[str, Any]
    claimed: list[tuple[str, Subscription]]
    # Claims taken over from a claimer that stopped after claiming: perhaps already sent.
    retaken: frozenset[str] = frozenset()


def build_result(
    message_id: str,
    outcome: Outcome,
    *,
    status: MessageStatus | None = None,
    source: str | None = None,
    started_at: float | None = None,
    polls: int | None = 0,
    error: str | None = None,
    now: float | None = None,
    campaign_id: str | None = None,
    retries: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The result dict every callback receives (and ``track_message`` returns).

    One shape for ``track_message`` and campaigns alike; a campaign's adds its
    ``campaign_id``, and its ``polls`` is None (a campaign counts checks, not per message).
    """
    # The outcome first: Flower's task list shows the start of each result.
    result: dict[str, Any] = {"outcome": outcome, "message_id": message_id}
    if campaign_id is not None:
        result["campaign_id"] = campaign_id
    result.update(
        deliverystatus=status.deliverystatus if status else None,
        cost=status.cost if status else None,
        polls=polls,
        started_at=iso(started_at) if started_at is not None else None,
        finished_at=iso(time.time() if now is None else now),
        source=source,
        error=error,
        status=status.to_json_dict() if status else None,
    )
    if retries is not None:
        # Flower keeps one reason per task: the tracking's history, counted by kind.
        result["retries"] = dict(retries)
    return result
