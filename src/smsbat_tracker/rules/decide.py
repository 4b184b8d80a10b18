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
   ``SMSBAT_NOT_FOUND_GRACE``; a permanent error ends it as ``error``.
5. A failed request (a network error, a timeout, 5xx, 429, a malformed body) is not a
   check: it says nothing about the message. It is retried on its own short backoff
   (:func:`~smsbat_tracker.rules.schedule.retry_backoff`: each second, backing off only an API
   that keeps failing; never before a 429's Retry-After), and the schedule's next step is
   kept for the next answer. A request the
   rate limit or the per-message gate turned away was no check either, and waits its turn.
6. The check at the deadline is the last: its answer, if not final, makes the outcome
   ``timeout``. It must get an answer: while it fails or gets no turn it is retried for up
   to ``SMSBAT_DEADLINE_GRACE``; a tracking that got no answer by then ends as
   ``timeout`` with the error :data:`NO_ANSWER`. Before the deadline, the next check
   follows the backoff schedule, its last wait landing on the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from smsbat_tracker.errors import (
    MessageNotFound,
    PermanentError,
    RateLimited,
    SmsbatError,
)
from smsbat_tracker.provider.models import DELIVERED, FAILED_STATUSES, MessageStatus
from smsbat_tracker.rules.schedule import retry_backoff

if TYPE_CHECKING:
    from smsbat_tracker.config import Settings
    from smsbat_tracker.rules.schedule import Schedule
    from smsbat_tracker.rules.seen import CachedStatus

__all__ = [
    "DEADLINE_FIRST",
    "DEADLINE_SLACK",
    "NO_ANSWER",
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
    "line_position",
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
# The error of a tracking whose deadline check got no answer within the grace.
NO_ANSWER: Final = "no answer from the API at the deadline"
# How far ahead of the checks that merely fell due a check at its deadline stands in the
# rate limit's line.
DEADLINE_FIRST: Final = 3600.0


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
    failures: int = 0  # requests failed in a row since the last answer


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the rules read, and the backoff schedule."""

    schedule: Schedule
    not_found_grace: float
    fresh_for: float
    trust_pushes: bool
    push_wait: float  # the longest wait while pushes are trusted
    deadline_grace: float = 10.0  # how long the deadline check is retried for an answer

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
            deadline_grace=settings.deadline_grace,
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
    """Check again in ``seconds``; ``counted`` when this one was a check (an answer),
    ``failed`` when its request failed (one more failure in a row)."""

    seconds: float
    counted: bool = True
    status: MessageStatus | None = None
    failed: bool = False


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
    if isinstance(answer, TryLater) or not isinstance(answer, MessageStatus | PermanentError):
        # No answer: not a check. Again shortly, never past the deadline (or its grace).
        failed = not isinstance(answer, TryLater)
        if isinstance(answer, TryLater):
            wait = answer.retry_in
        else:
            retry_after = answer.retry_after if isinstance(answer, RateLimited) else None
            wait = retry_backoff(progress.failures + 1, retry_after=retry_after)
        if at_deadline:
            left = progress.deadline_at + rules.deadline_grace - now
            if left <= DEADLINE_SLACK:
                return Finish("timeout", last, NO_ANSWER)
            return Wait(min(wait, left), counted=False, status=last, failed=failed)
        left = max(progress.deadline_at - now, 0.0)
        return Wait(min(wait, left), counted=False, status=last, failed=failed)
    if isinstance(answer, MessageStatus):
        if answer.is_final:
            return Finish(outcome_of(answer), answer)
        last = answer
    elif isinstance(answer, MessageNotFound):
        if at_deadline or now - progress.started_at > rules.not_found_grace:
            return Finish("error", last, str(answer))
    elif isinstance(answer, PermanentError):
        return Finish("error", last, str(answer))
    if at_deadline:
        return Finish("timeout", last)
    following = rules.schedule.next_wait(
        now=now,
        deadline_at=progress.deadline_at,
        attempt=progress.checks + 1,
        last_check_at=now,
    )
    if following is None:  # the deadline check has happened
        return Finish("timeout", last)
    return Wait(following, status=last)


def line_position(progress: Progress, *, due_at: float, now: float) -> float:
    """Where a check stands in the rate limit's line (the lowest goes first): when it fell
    due; a check at its deadline, or in its grace, before any other, the earliest deadline
    first. After a 429's pause, the checks closest to their deadlines are served first."""
    if now >= progress.deadline_at - DEADLINE_SLACK:
        return progress.deadline_at - DEADLINE_FIRST
    return due_at
