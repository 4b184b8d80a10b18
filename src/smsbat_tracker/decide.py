"""The tracking rules, in one pure function: what to do next with a tracked message.

``track_message``, campaign ticks and the webhook receiver all ask :func:`decide`; no other
code holds a rule. It does no I/O: it takes what is known of the tracking
(:class:`Progress`), the cached status, this check's answer (a status, an error, or
nothing yet) and the time, and returns one of

- :class:`Ask`: ask the API now (then call again with its answer);
- :class:`Finish`: the outcome is known (a final status, an error, or the deadline);
- :class:`Wait`: check again in so many seconds;
- :class:`AwaitPush`: the provider pushes this message's changes; look again only at the
  deadline (or in steps far below the visibility timeout).

The rules, in order:

1. A final status in the cache ends the tracking (a push, another tracker, an earlier run).
2. A message whose changes the provider pushes is not polled until the deadline
   (``SMSBAT_TRUST_PUSHES``).
3. A status someone cached less than ``SMSBAT_FRESH_FOR`` ago is as good as asking.
4. Otherwise ask. A final answer ends it; a message the API does not know yet is given
   ``SMSBAT_NOT_FOUND_GRACE``; a permanent error ends it as ``error``; a 429's Retry-After
   stretches the next wait; a request the rate limit or the per-message gate turned away
   was no check and waits its turn.
5. The check at the deadline is the last: without a final status the outcome is
   ``timeout``. Before it, the next check follows the backoff schedule, its last wait
   landing on the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from smsbat_tracker.errors import MessageNotFound, PermanentError, RateLimited, SmsbatError
from smsbat_tracker.models import DELIVERED, FAILED_STATUSES, MessageStatus

if TYPE_CHECKING:
    from smsbat_tracker.backoff import Schedule
    from smsbat_tracker.cache import CachedStatus
    from smsbat_tracker.config import Settings

__all__ = [
    "DEADLINE_SLACK",
    "OUTCOMES",
    "Answer",
    "Ask",
    "AwaitPush",
    "Decision",
    "Finish",
    "Outcome",
    "Progress",
    "Rules",
    "TryLater",
    "Wait",
    "decide",
    "outcome_of",
]

Outcome = Literal["delivered", "undeliverable", "permanenterror", "timeout", "error"]
OUTCOMES: Final[tuple[str, ...]] = (
    "delivered",
    "undeliverable",
    "permanenterror",
    "timeout",
    "error",
)
# A check due within this of the deadline is the deadline check.
DEADLINE_SLACK: Final = 0.05


class TryLater(Exception):
    """No status request now: wait ``retry_in`` s.

    ``reason`` is ``"gate"`` (the message was checked less than the minimum interval ago)
    or ``"rate"`` (the global rate limit has no token in time).
    """

    def __init__(self, retry_in: float, reason: Literal["gate", "rate"] = "gate") -> None:
        super().__init__(f"no request now ({reason}); retry in {retry_in:.3f} s")
        self.retry_in = retry_in
        self.reason = reason


def outcome_of(status: MessageStatus) -> Outcome:
    """The outcome a final status means."""
    if status.deliverystatus == DELIVERED:
        return "delivered"
    if status.deliverystatus in FAILED_STATUSES:
        return status.deliverystatus  # type: ignore[return-value]
    raise ValueError(f"{status.deliverystatus!r} is not final")


@dataclass(frozen=True, slots=True)
class Progress:
    """What the rules need to know of one message's tracking."""

    started_at: float
    deadline_at: float
    checks: int = 0  # checks made so far (the next one is ``checks + 1``)
    pushed: bool = False  # a push was seen for the message


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the rules read, and the backoff schedule."""

    schedule: Schedule
    not_found_grace: float
    fresh_for: float
    trust_pushes: bool
    push_wait: float  # the longest wait while pushes are trusted

    @classmethod
    def from_settings(cls, settings: Settings, schedule: Schedule) -> Rules:
        """The rules for ``settings``."""
        return cls(
            schedule=schedule,
            not_found_grace=settings.not_found_grace,
            fresh_for=settings.fresh_for,
            trust_pushes=settings.trust_pushes,
            # Far below the visibility timeout, so that a waiting task is never redelivered.
            push_wait=max(settings.max_delay, settings.visibility_timeout / 4),
        )


@dataclass(frozen=True, slots=True)
class Ask:
    """Ask the API now."""


@dataclass(frozen=True, slots=True)
class Finish:
    """The outcome is known; ``status`` is the last one seen, ``error`` says why not."""

    outcome: Outcome
    status: MessageStatus | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Check again in ``seconds``; ``counted`` when this one was a check."""

    seconds: float
    counted: bool = True
    status: MessageStatus | None = None


@dataclass(frozen=True, slots=True)
class AwaitPush:
    """The provider pushes this message: look again in ``seconds`` (at the deadline)."""

    seconds: float


Decision = Ask | Finish | Wait | AwaitPush
Answer = MessageStatus | SmsbatError | TryLater


def decide(
    progress: Progress,
    *,
    cached: CachedStatus | None,
    now: float,
    rules: Rules,
    answer: Answer | None = None,
) -> Decision:
    """What to do next; ``answer`` is this check's (None before asking). See the module."""
    at_deadline = now >= progress.deadline_at - DEADLINE_SLACK
    last = cached.status if cached is not None else None
    if answer is None:
        if cached is not None and cached.is_final:
            return Finish(outcome_of(cached.status), cached.status)
        pushed = progress.pushed or (cached is not None and cached.source == "push")
        if pushed and rules.trust_pushes and not at_deadline:
            return AwaitPush(min(progress.deadline_at - now, rules.push_wait))
        if cached is None or at_deadline or cached.age(now) >= rules.fresh_for:
            return Ask()
        answer = cached.status  # someone else just checked: that answer is as good as ours
    if isinstance(answer, TryLater):
        if at_deadline:
            return Finish("timeout", last)
        return Wait(min(answer.retry_in, max(progress.deadline_at - now, 0.0)), counted=False)
    retry_after: float | None = None
    if isinstance(answer, MessageStatus):
        if answer.is_final:
            return Finish(outcome_of(answer), answer)
        last = answer
    elif isinstance(answer, MessageNotFound):
        if at_deadline or now - progress.started_at > rules.not_found_grace:
            return Finish("error", last, str(answer))
    elif isinstance(answer, PermanentError):
        return Finish("error", last, str(answer))
    elif isinstance(answer, RateLimited):
        retry_after = answer.retry_after
    if at_deadline:
        return Finish("timeout", last)
    wait = rules.schedule.next_wait(
        now=now,
        deadline_at=progress.deadline_at,
        attempt=progress.checks + 1,
        last_check_at=now,
        retry_after=retry_after,
    )
    if wait is None:  # the deadline check has happened
        return Finish("timeout", last)
    return Wait(wait, status=last)
