"""Every tracking rule, in pure functions: when a message is checked, and what follows.

``track_message``, campaign ticks and the webhook receiver ask these functions; no other
code holds a rule. None does I/O, reads a clock or draws from the global ``random``: the
time (``now``) and the jitter's source (``rng``, a draw in [0, 1) such as a
``random.Random``'s ``random``) come in as arguments.

- :func:`first_check_at`: when a tracked message is first checked;
- :func:`campaign_first_check_at`, :func:`campaign_first_tick_at`: when a campaign's
  messages are first checked, and when its tick chains first run;
- :func:`decide`: what to do next with one message, at each check (a tracked message's or
  a campaign's alike). It takes what is known of the tracking (:class:`Progress`), the
  cached status, this check's answer (a status, an error, or nothing yet) and the time,
  and returns one of

  - :class:`Ask`: ask the API now (then call again with its answer);
  - :class:`Finish`: the outcome is known (a final status, an error, or the deadline);
  - :class:`Wait`: check again in so many seconds;
  - :class:`AwaitPush`: the provider pushes this message's changes; look again only at
    the deadline (or in steps far below the visibility timeout);
- :func:`line_position`: where a check stands in the rate limit's line;
- :func:`campaign_over`, :func:`campaign_ends_at`: whether, and when, a campaign is over;
- :func:`expire`: what a message still open when its campaign is over ends as.

The rules, in order:

1. A tracked message is first checked ``SMSBAT_FIRST_DELAY`` after it is enqueued, never
   after its deadline; at once when its final status is known already (a push came
   first).
2. A campaign's messages are first checked ``SMSBAT_FIRST_DELAY`` after the enqueue,
   spread by up to ``±SMSBAT_JITTER`` of it so that a large send does not poll in one
   burst, never after the deadline. Its tick chains first run when the earliest of them
   can fall due, ``SMSBAT_FIRST_DELAY * (1 - SMSBAT_JITTER)`` after the enqueue.
3. A final status in the cache ends the tracking (a push, another tracker, an earlier run).
4. A message whose changes the provider pushes (a push was seen for it, or its cached
   status came by push: a campaign's messages too) is not polled until the deadline
   (``SMSBAT_TRUST_PUSHES``).
5. A status someone cached less than ``SMSBAT_FRESH_FOR`` ago is as good as asking.
6. Otherwise ask. A final answer ends it; a message the API does not know yet is given
   ``SMSBAT_NOT_FOUND_GRACE``; a permanent error ends it as ``error``.
7. A failed request (a network error, a timeout, 5xx, 429, a malformed body) is not a
   check: it says nothing about the message. It is retried on its own short backoff
   (:func:`~smsbat_tracker.rules.schedule.retry_backoff`: each second, backing off only an API
   that keeps failing; never before a 429's Retry-After), and the schedule's next step is
   kept for the next answer. A request the rate limit or the per-message gate turned
   away was no check either, and waits its turn.
8. The check at the deadline is the last: its answer, if not final, makes the outcome
   ``timeout``. It must get an answer: while it fails or gets no turn it is retried for up
   to ``SMSBAT_DEADLINE_GRACE``; a tracking that got no answer by then ends as
   :func:`expire` says (``timeout`` with the error :data:`NO_ANSWER`). Before the
   deadline, the next check follows the backoff schedule (its jitter drawn from ``rng``),
   its last wait landing on the deadline.
9. A campaign is over when none of its messages is left, or once its deadline check's
   grace and one more tick have passed: ``SMSBAT_DEADLINE_GRACE + SMSBAT_MAX_DELAY +
   SMSBAT_MIN_INTERVAL`` after the deadline.
10. A message still open when its campaign is over has had its grace: it ends as its
    cached final status says, else as ``timeout`` with the error :data:`NO_ANSWER`.
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
    from smsbat_tracker.rules.schedule import Rng, Schedule
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
    "campaign_ends_at",
    "campaign_first_check_at",
    "campaign_first_tick_at",
    "campaign_over",
    "decide",
    "expire",
    "first_check_at",
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
    rng: Rng,
) -> Decision:
    """What to do next; ``answer`` is this check's (None before asking), ``rng`` the
    source of the next wait's jitter. See the module (rules 3-8)."""
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
                return expire(cached)
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
        rng=rng,
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


def expire(cached: CachedStatus | None) -> Finish:
    """How a tracking ends that has no time left to ask (rule 10, and rule 8 at the end of
    the grace): as its cached final status says, else ``timeout`` with :data:`NO_ANSWER`
    and the last status seen."""
    if cached is not None and cached.is_final:
        return Finish(outcome_of(cached.status), cached.status)
    return Finish("timeout", cached.status if cached is not None else None, NO_ANSWER)


def first_check_at(rules: Rules, *, now: float, deadline_at: float, final: bool = False) -> float:
    """When a tracked message enqueued at ``now`` is first checked (rule 1): ``now`` when
    its ``final`` status is known already, else ``SMSBAT_FIRST_DELAY`` later, never after
    ``deadline_at``. The first run's countdown is this minus ``now``."""
    if final:
        return now
    return min(now + rules.schedule.first_delay, deadline_at)


def campaign_first_check_at(
    rules: Rules, *, started_at: float, deadline_at: float, rng: Rng
) -> float:
    """When a campaign message is first checked (rule 2): ``SMSBAT_FIRST_DELAY`` after the
    campaign's start, spread by up to ``±SMSBAT_JITTER`` of it (one draw of ``rng``),
    never after ``deadline_at``."""
    first, jitter = rules.schedule.first_delay, rules.schedule.jitter
    return min(started_at + first * (1 + jitter * (2 * rng() - 1)), deadline_at)


def campaign_first_tick_at(rules: Rules, *, started_at: float) -> float:
    """When a campaign's tick chains first run (rule 2): when the earliest first check can
    fall due, ``SMSBAT_FIRST_DELAY * (1 - SMSBAT_JITTER)`` after the campaign's start."""
    return started_at + rules.schedule.first_delay * (1 - rules.schedule.jitter)


def campaign_ends_at(rules: Rules, *, deadline_at: float) -> float:
    """When a campaign that still has messages open is over (rule 9): its deadline check's
    grace and one more tick (a wait of at most ``SMSBAT_MAX_DELAY``, then the gate's
    interval) after ``deadline_at``."""
    grace = rules.deadline_grace + rules.schedule.max_delay + rules.schedule.min_interval
    return deadline_at + grace


def campaign_over(rules: Rules, *, deadline_at: float, now: float, left: int | None = None) -> bool:
    """Whether a campaign is over (rule 9): none of its messages is ``left`` (None: not
    counted yet), or ``now`` is past :func:`campaign_ends_at`. The messages still open then
    end as :func:`expire` says."""
    return left == 0 or now > campaign_ends_at(rules, deadline_at=deadline_at)
