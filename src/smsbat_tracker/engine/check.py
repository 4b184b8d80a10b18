"""A check of one message: its two round trips around the API call, and one-off reads.

A run of ``track_message`` makes two round trips of its own: :meth:`Checks.start` (the
session, the outcome, the cache, and a turn to ask the API: the message's gate, then a
rate-limit token) before it decides, and :meth:`Checks.after` (the answer cached, the poll
counted, an unused turn given back, a 429's pause; then the next run scheduled, or the
outcome settled) after. ``get_status`` and ``poll`` serve one-off callers through the same
gate and rate limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from smsbat_tracker import metrics
from smsbat_tracker.config import NO_CREDENTIALS, Settings
from smsbat_tracker.engine.late import LateAnswers
from smsbat_tracker.engine.session import Session
from smsbat_tracker.engine.sessions import Sessions
from smsbat_tracker.errors import ConfigError, RateLimited, RequestTimeout, SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.provider.models import IN_FLIGHT, MessageStatus, validate_message_id
from smsbat_tracker.rules.decide import Rules, TryLater
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import RateLimiter
from smsbat_tracker.store.session_scripts import (
    After,
    AfterCheck,
    BeforeCheck,
    Ran,
    Reschedule,
    Settle,
    TakeTurn,
    TurnAsk,
    TurnCode,
    TurnReply,
)

__all__ = ["CHECK_WAIT", "Check", "Checks", "Start", "Turn"]

# The longest a check sleeps in its worker for a rate-limit token: past that it hands the
# worker back and comes back when the limit says its turn comes (a sleeping check would
# hold up the callbacks queued behind it).
CHECK_WAIT: Final = 0.25

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Turn:
    """Whether a run may ask the API now, as the before-check script found.

    ``taken``: the gate and a rate-limit token are the run's, the token due in ``wait``
    seconds. Otherwise ``wait`` is how long until asking again makes sense, and ``reason``
    says who turned it away.
    """

    taken: bool
    wait: float
    reason: Literal["gate", "rate"] = "rate"

    @classmethod
    def of(cls, reply: TurnReply) -> Turn:
        """A script's turn reply (not ``TurnCode.NONE``) in seconds."""
        if reply.code == TurnCode.GATE:  # checked by someone else within the interval (ms)
            return cls(False, max(reply.wait, 1) / 1000, "gate")
        return cls(reply.code == TurnCode.TAKEN, reply.wait / 1_000_000)


@dataclass(frozen=True, slots=True)
class Start:
    """What a run learns in its first round trip (:meth:`Checks.start`)."""

    session: Session
    recorded: dict[str, Any] | None  # the outcome, when the tracking has ended
    cached: CachedStatus | None
    turn: Turn | None  # None for a run that may not check (ended, or not the expected run)
    first: bool = False  # the tracking's first run to start: counted once as started


@dataclass(frozen=True, slots=True)
class Check:
    """What a run learned, written with its next step in its second round trip."""

    answer: MessageStatus | None = None  # the API's answer: cached
    asked: bool = False  # a request was made (counted as a poll)
    unused_turn: bool = False  # a turn was taken and not used: given back
    pushed: bool = False  # the provider pushes this message's changes: noted
    pause: float | None = None  # a 429's pause for every caller, seconds


class Checks:
    """The checks of one process's trackings, through the gate and the rate limit."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        keys: Keys,
        *,
        sessions: Sessions,
        cache: StatusCache,
        limiter: RateLimiter,
        rules: Rules,
        api: SmsbatClient | None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._sessions = sessions
        self._cache = cache
        self._limiter = limiter
        self._rules = rules
        self.api = api
        # A run's request waits SMSBAT_ANSWER_WAIT in the worker; none when that is no
        # shorter than the timeouts themselves.
        waits = settings.answer_wait < settings.connect_timeout + settings.read_timeout
        self.late = LateAnswers(settings.answer_wait) if waits else None
        self.before = BeforeCheck(client)
        self.after_check = AfterCheck(client)
        self._take_turn = TakeTurn(client)

    def start(
        self,
        message_id: str,
        *,
        owner: str,
        run: int,
        started_at: float,
        deadline_at: float,
        due_at: float,
    ) -> Start:
        """A run's first round trip: the session, the outcome, the cache and a turn.

        Creates the session (and its due entry) unless one exists, as when the task was
        sent by name. For the run the session expects, while nothing is recorded, it also
        takes a turn to ask the API (:class:`Turn`), waiting at most :data:`CHECK_WAIT`
        for a token, never past the deadline, in the limit's line by ``due_at`` (when the
        run fell due). A run that then does not ask gives it back in :meth:`reschedule`
        or settle (``Check(unused_turn=True)``).
        """
        now = time.time()
        # Never a token past the deadline check's grace.
        ahead = max(0.0, min(CHECK_WAIT, deadline_at + self._rules.deadline_grace - now))
        keys = self._keys
        before = self.before(
            session=keys.session(message_id),
            outcome=keys.outcome(message_id),
            status=keys.status(message_id),
            due=keys.due(),
            opening=self._sessions.opening(message_id, owner, started_at, deadline_at, now),
            run=run,
            turn=self._turn_ask(message_id, ahead=ahead, due_at=due_at),
        )
        session = Sessions.parse(message_id, before.fields)
        assert session is not None  # the script creates it
        return Start(
            session,
            json.loads(before.outcome) if before.outcome else None,
            StatusCache.parse(before.cached) if before.cached else None,
            None if before.turn.code == TurnCode.NONE else Turn.of(before.turn),
            before.first,
        )

    def _turn_ask(self, message_id: str, *, ahead: float, due_at: float | None) -> TurnAsk:
        """What a turn is asked with: the gate, then a token within ``ahead`` seconds."""
        limiter = self._limiter
        return TurnAsk(
            gate=self._keys.poll_gate(message_id),
            gate_ms=int(self._settings.min_interval * 1000),
            limit_on=limiter.enabled,
            limit_keys=limiter.keys,
            limit_args=limiter.script_args(
                1,
                ahead=ahead,
                # A tracking keeps its place in the limit's line; a one-off caller does not.
                waiter=Keys.due_message(message_id) if due_at is not None else "",
                due_at=due_at,
            ),
        )

    def reschedule(
        self,
        message_id: str,
        *,
        owner: str,
        run: int,
        next_at: float,
        counted: bool,
        failed: bool = False,
        check: Check | None = None,
        why: str = "",
    ) -> bool:
        """A run's second round trip when tracking goes on: ``check`` is written (see
        :class:`Check`); the check is recorded (when ``counted``: an answer), or a failed
        request (``failed``), and the owner's next run put in the due index.

        Fenced: False, and no next run, when ``owner``'s run ``run`` is no longer the one
        the session expects (the re-driver took the tracking over, or this is a stale copy
        of the run). The caller then stops without publishing anything.
        """
        ran = Ran.ANSWERED if counted else Ran.FAILED if failed else Ran.NEITHER
        after = self.after(message_id, check, Reschedule(owner, run, next_at, ran, why))
        return bool(after.code)

    def after(self, message_id: str, check: Check | None, step: Reschedule | Settle) -> After:
        """A run's second round trip: ``check`` written, then ``step`` taken."""
        check = check or Check()
        answer = check.answer
        unknown = ""
        if answer is not None and not answer.is_final and answer.deliverystatus not in IN_FLIGHT:
            unknown = answer.deliverystatus[:64]
        pause = check.pause
        keys = self._keys
        bucket, pause_key = self._limiter.keys[0], self._limiter.keys[1]
        after = self.after_check(
            session=keys.session(message_id),
            status=keys.status(message_id),
            due=keys.due(),
            outcome=keys.outcome(message_id),
            subs=keys.subs(message_id),
            claims=keys.claims(message_id),
            gate=keys.poll_gate(message_id),
            bucket=bucket,
            pause_key=pause_key,
            due_member=Keys.due_message(message_id),
            step=step,
            count_poll=check.asked,
            mark_pushed=check.pushed,
            unknown_status=unknown,
            unused_turn_us=self._limiter.interval_us if check.unused_turn else None,
            pause_ms=max(1, int(pause * 1000)) if pause is not None else None,
            answer=None if answer is None else self._cache.store_args(answer, source="poll"),
        )
        if after.unknown_new:
            log.warning("track.unknown_status", message_id=message_id, deliverystatus=unknown)
        if after.paused and pause is not None:
            log.warning("ratelimit.pause", seconds=round(pause, 3))
        return after

    def require_api(self) -> SmsbatClient:
        """The API client; :class:`ConfigError` naming SMSBAT_API_KEY in a process built
        without credentials (the webhook receiver, or one that only enqueues)."""
        if self.api is None:
            raise ConfigError(f"invalid settings: {NO_CREDENTIALS}")
        return self.api

    def ask(self, message_id: str, turn: Turn, *, late: bool = False) -> MessageStatus:
        """Ask the API for the status with a ``turn`` taken for it.

        Raises :class:`TryLater` when the turn was not taken (the caller waits and comes
        back), after sleeping until the token is due otherwise; raises the client's
        :mod:`~smsbat_tracker.errors` too. Caches nothing: the caller's next step does;
        but with ``late`` (a tracking's run), an answer that does not come within
        ``SMSBAT_ANSWER_WAIT`` raises :class:`~smsbat_tracker.errors.AnswerLate` and is
        cached when it comes (:mod:`.late`).
        """
        if not turn.taken:
            if turn.reason == "rate":
                metrics.get().rate_waits.labels("deferred").inc()
            raise TryLater(turn.wait, turn.reason)
        if turn.wait > 0:
            metrics.get().rate_waits.labels("slept").inc()
            time.sleep(turn.wait)
        api = self.require_api()
        if not late or self.late is None:
            return api.get_status(message_id)

        def keep(status: MessageStatus) -> None:
            self._cache.store(message_id, status, source="poll", unless_finished=True)

        return self.late.get(lambda: api.get_status(message_id), keep)

    def poll(self, message_id: str) -> MessageStatus:
        """One status request for a one-off caller, through the gate and the global rate
        limit (waiting at most :data:`CHECK_WAIT` for a token), cached.

        Raises :class:`TryLater` when it may not ask now, and the client's
        :mod:`~smsbat_tracker.errors`.
        """
        validate_message_id(message_id)
        reply = self._take_turn(self._turn_ask(message_id, ahead=CHECK_WAIT, due_at=None))
        try:
            status = self.ask(message_id, Turn.of(reply))
        except SmsbatError as exc:
            self._limiter.observe_error(exc)
            raise
        self._cache.store(message_id, status, source="poll")
        return status

    def get_status(self, message_id: str) -> MessageStatus:
        """The message's status, from the cache while fresh, else from the API.

        When another caller checked the message within the last interval, waits for the
        gate and reads what that caller cached instead of calling the API again. A
        finished tracking answers with the final status its outcome kept. Raises
        :class:`~smsbat_tracker.errors.RateLimited` when the global rate limit has no
        token within ``SMSBAT_READ_TIMEOUT``.
        """
        validate_message_id(message_id)
        give_up = time.monotonic() + self._settings.min_interval + self._settings.read_timeout
        while True:
            cached = self._cache.get(message_id)
            if cached is not None:
                return cached.status
            final = self._sessions.final_status(message_id)
            if final is not None:
                return final
            try:
                return self.poll(message_id)
            except TryLater as later:
                if time.monotonic() > give_up:
                    if later.reason == "rate":
                        raise RateLimited(
                            later.retry_in, "the global SMSBAT_RATE_LIMIT has no token left"
                        ) from None
                    raise RequestTimeout(
                        "another check of this message produced no status in time"
                    ) from None
                time.sleep(min(later.retry_in, 0.25))
