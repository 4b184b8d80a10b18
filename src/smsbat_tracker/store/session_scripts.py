"""The tracking session's Lua scripts, one typed wrapper each: the engine's only door to them.

Each wrapper lays out KEYS and ARGV in the order its ``lua/session_*.lua`` file names them,
and gives its reply back typed. What several scripts share (opening a session, taking a
turn, cutting a finished tracking back to its outcome) is in ``lua/lib/``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from smsbat_tracker.store.ratelimit import TICKET_GRACE
from smsbat_tracker.store.scripts import Script

__all__ = [
    "ANSWER_ARGS",
    "RETRY_REASONS",
    "SESSION_FIELDS",
    "AbandonCode",
    "AbandonSession",
    "After",
    "AfterCheck",
    "AfterCode",
    "Before",
    "BeforeCheck",
    "BrokerSlice",
    "InBroker",
    "MarkSent",
    "Ran",
    "RegisterSession",
    "Registered",
    "ReleaseClaims",
    "Reschedule",
    "ScanPlace",
    "SentCode",
    "SessionOpening",
    "Settle",
    "Settled",
    "TakeTurn",
    "TurnAsk",
    "TurnCode",
    "TurnReply",
]

# The kinds of reason a tracking's next run comes for, counted per session ("why:<kind>").
RETRY_REASONS: Final = ("in_flight", "no_turn", "request_failed", "awaiting_push")
# A session's fields as the scripts read them (lib/session.lua's SESSION_FIELDS: a test
# checks that they agree).
SESSION_FIELDS: Final = (
    "owner",
    "started_at",
    "deadline_at",
    "checks",
    "polls",
    "pushed",
    "run",
    "failures",
    *(f"why:{kind}" for kind in RETRY_REASONS),
)
# How many ARGV the cached answer takes in session_after.lua (StatusCache.store_args).
ANSWER_ARGS: Final = 10


class TurnCode(enum.IntEnum):
    """Whether a caller may ask the API now (lib/turn.lua's ``TURN_*``)."""

    RATE = 0  # no rate-limit token: ``wait`` is the us to wait
    TAKEN = 1  # the gate and a token are the caller's, the token due in ``wait`` us
    GATE = 2  # someone checked the message within the minimum interval: ``wait`` ms left
    NONE = 3  # none taken: the run may not check (session_before.lua)


@dataclass(frozen=True, slots=True)
class TurnReply:
    """A turn as a script gave it: its code and the wait (us, or ms for ``GATE``)."""

    code: TurnCode
    wait: int


@dataclass(frozen=True, slots=True)
class TurnAsk:
    """What a turn is asked with (lib/turn.lua's ``take_turn``)."""

    gate: str  # the message's gate key
    gate_ms: int  # the minimum interval between two checks
    limit_on: bool  # the rate limit is on
    limit_keys: Sequence[str]  # RateLimiter.keys
    limit_args: Sequence[Any]  # RateLimiter.script_args

    def keys(self) -> list[str]:
        """The turn's KEYS, in the scripts' order."""
        return [self.gate, *self.limit_keys]

    def args(self) -> list[Any]:
        """The turn's ARGV, in the scripts' order."""
        return [self.gate_ms, "1" if self.limit_on else "", *self.limit_args]


@dataclass(frozen=True, slots=True)
class SessionOpening:
    """The session to open when none exists (lib/session.lua's ``open_session``)."""

    owner: str  # the task id that tracks the message
    started_at: float
    deadline_at: float
    ttl_ms: int
    due_at: float  # when the owner's first run is due: its score in the due index
    due_member: str  # the session's member of the due index

    def args(self) -> list[Any]:
        """The opening's ARGV, in the scripts' order."""
        return [
            self.owner,
            repr(self.started_at),
            repr(self.deadline_at),
            self.ttl_ms,
            repr(self.due_at),
            self.due_member,
        ]


@dataclass(frozen=True, slots=True)
class Registered:
    """What ``session_register.lua`` found and did."""

    fields: list[Any]  # the session's SESSION_FIELDS
    added: bool  # the subscription is new
    cached: str | bytes | None  # the cached status's raw entry
    ended: bool  # an outcome is recorded


class RegisterSession(Script):
    """``session_register.lua``: a new tracking's subscription, session and reads at once."""

    file = "session_register.lua"

    def __call__(
        self,
        *,
        session: str,
        subs: str,
        status: str,
        due: str,
        outcome: str,
        opening: SessionOpening,
        subscription: str,
        subscription_json: str,
        subs_ttl_ms: int,
    ) -> Registered:
        fields, added, cached, ended = self.run(
            [session, subs, status, due, outcome],
            [*opening.args(), subscription, subscription_json, subs_ttl_ms],
        )
        return Registered(list(fields), bool(added), cached, bool(ended))


class TakeTurn(Script):
    """``session_turn.lua``: a one-off caller's turn (the gate, then a token)."""

    file = "session_turn.lua"

    def __call__(self, turn: TurnAsk) -> TurnReply:
        code, wait = self.run(turn.keys(), turn.args())
        return TurnReply(TurnCode(int(code)), int(wait))


@dataclass(frozen=True, slots=True)
class Before:
    """What a run learns in its first round trip (``session_before.lua``)."""

    fields: list[Any]  # the session's SESSION_FIELDS
    outcome: str  # the recorded result's JSON, or ''
    cached: str | bytes  # the cached status's raw entry, or ''
    turn: TurnReply  # TurnCode.NONE when the run may not check
    first: bool = False  # the tracking's first run to start (once per session)


class BeforeCheck(Script):
    """``session_before.lua``: a check's first round trip (session, outcome, cache, turn)."""

    file = "session_before.lua"

    def __call__(
        self,
        *,
        session: str,
        outcome: str,
        status: str,
        due: str,
        opening: SessionOpening,
        run: int,
        turn: TurnAsk,
    ) -> Before:
        fields, recorded, cached, (code, wait), first = self.run(
            [session, outcome, status, due, *turn.keys()],
            [*opening.args(), run, *turn.args(), int(TICKET_GRACE * 1_000_000)],
        )
        turn_reply = TurnReply(TurnCode(int(code)), int(wait))
        return Before(list(fields), str(recorded or ""), cached, turn_reply, bool(first))


class AbandonCode(enum.IntEnum):
    """What ``session_abandon.lua`` did with the session."""

    KEPT = 0  # another owner holds it, or there is none
    DROPPED = 1


class AbandonSession(Script):
    """``session_abandon.lua``: undo a registration whose task was never published."""

    file = "session_abandon.lua"

    def __call__(self, *, session: str, subs: str, owner: str, subscription: str) -> AbandonCode:
        return AbandonCode(int(self.run([session, subs], [owner, subscription])))


class Ran(enum.StrEnum):
    """What a run was, for the session's counters (session_after.lua's ``ran``)."""

    ANSWERED = "1"  # a check: the API (or the cache) answered
    FAILED = "f"  # a request failed
    NEITHER = "0"


@dataclass(frozen=True, slots=True)
class Reschedule:
    """The after-check's step when tracking goes on: the owner's next run, fenced."""

    owner: str  # the run's task id
    run: int  # the run's number: the session must expect it
    next_at: float  # when the next run is due
    ran: Ran
    why: str = ""  # the kind of reason the next run comes for (RETRY_REASONS), counted


@dataclass(frozen=True, slots=True)
class Settle:
    """The after-check's step that ends a tracking: record, then claim the callbacks."""

    result_json: str  # the result to record, '' to record nothing
    outcome_ttl_ms: int
    claimer: str
    now_ms: int
    stale_ms: int  # a claim this old belongs to a claimer that died


# session_after.lua's steps.
_SETTLE: Final = "settle"
_RESCHEDULE: Final = "reschedule"


class AfterCode(enum.IntEnum):
    """Whether the after-check's step was done (session_after.lua)."""

    SUPERSEDED = 0  # the run is no longer the one the session expects: nothing scheduled
    DONE = 1


@dataclass(frozen=True, slots=True)
class Settled:
    """What the settle step did."""

    recorded: bool  # the outcome was recorded by this call
    outcome: str  # the recorded result's JSON, '' when there is none
    claimed: list[tuple[str, str]]  # (subscription id, its JSON) claimed by this call
    retaken: frozenset[str]  # claims taken over from a claimer that stopped


@dataclass(frozen=True, slots=True)
class After:
    """The after-check's reply."""

    code: AfterCode
    unknown_new: bool  # the unknown status was noted for the first time
    paused: bool  # this call paused every caller
    settled: Settled | None  # for the settle step


class AfterCheck(Script):
    """``session_after.lua``: a check's second round trip, and the settle step."""

    file = "session_after.lua"

    def __call__(
        self,
        *,
        session: str,
        status: str,
        due: str,
        outcome: str,
        subs: str,
        claims: str,
        gate: str,
        bucket: str,
        pause_key: str,
        due_member: str,
        step: Reschedule | Settle,
        count_poll: bool,
        mark_pushed: bool,
        unknown_status: str,
        unused_turn_us: float | None,
        pause_ms: int | None,
        answer: Sequence[Any] | None,
    ) -> After:
        """``answer``: the API's answer to cache (StatusCache.store_args), or None."""
        if isinstance(step, Settle):
            resched: list[Any] = ["", 0, due_member, _SETTLE, 0, Ran.NEITHER.value]
            settle: list[Any] = [
                step.result_json,
                step.outcome_ttl_ms,
                step.claimer,
                step.now_ms,
                step.stale_ms,
            ]
        else:
            resched = [
                step.owner,
                step.run,
                due_member,
                _RESCHEDULE,
                repr(step.next_at),
                step.ran.value,
            ]
            settle = ["", 0, "", 0, 0]
        why = step.why if isinstance(step, Reschedule) else ""
        args = [
            *resched,
            "1" if count_poll else "",
            "1" if mark_pushed else "",
            unknown_status,
            "" if unused_turn_us is None else repr(unused_turn_us),
            "" if pause_ms is None else pause_ms,
            *settle,
            # Padded to its full length without one: ``why`` has a fixed place after it.
            *(["1", *answer] if answer is not None else [""] * (1 + ANSWER_ARGS)),
            why,
        ]
        code, unknown, paused, reply = self.run(
            [session, status, due, outcome, subs, claims, gate, bucket, pause_key], args
        )
        settled = None
        if isinstance(step, Settle):
            recorded, raw, flat, retaken = reply
            settled = Settled(
                bool(recorded),
                str(raw or ""),
                [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)],
                frozenset(map(str, retaken)),
            )
        return After(AfterCode(int(code)), bool(unknown), bool(paused), settled)


class SentCode(enum.IntEnum):
    """Whether ``session_sent.lua`` marked the last dispatch sent."""

    SOME_LEFT = 0
    ALL_SENT = 1  # the message left the due index; what it keeps is its outcome


class MarkSent(Script):
    """``session_sent.lua``: mark one subscription's dispatch sent."""

    file = "session_sent.lua"

    def __call__(
        self,
        *,
        claims: str,
        subs: str,
        due: str,
        outcome: str,
        session: str,
        status: str,
        due_member: str,
        subscription: str,
    ) -> SentCode:
        keys = [claims, subs, due, outcome, session, status]
        return SentCode(int(self.run(keys, [due_member, subscription])))


class ReleaseClaims(Script):
    """``session_release.lua``: give back a failed dispatch's claims; how many."""

    file = "session_release.lua"

    def __call__(self, *, claims: str, mark_prefix: str, subscriptions: Sequence[str]) -> int:
        return int(self.run([claims], [mark_prefix, len(subscriptions), *subscriptions]))


class ScanPlace(enum.IntEnum):
    """Where a broker scan goes on (session_in_broker.lua's places)."""

    DONE = 0  # finished, or every id found
    FIRST = 1  # where a scan starts: the first queue list


@dataclass(frozen=True, slots=True)
class BrokerSlice:
    """One call's slice of a broker scan: what it found, and where to go on."""

    found: frozenset[str]
    at: int  # ScanPlace.DONE, or the place to go on at
    cursor: str  # the offset, or the HSCAN cursor, in that place
    # The ids found in kombu's unacked hash: id -> delivery tag (fetched by a worker).
    unacked: Mapping[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Nothing is left to scan (or to find)."""
        return self.at == ScanPlace.DONE


class InBroker(Script):
    """``session_in_broker.lua``: which task ids the broker holds, a bounded slice a call."""

    file = "session_in_broker.lua"

    def __call__(
        self,
        *,
        unacked: str,
        queues: Sequence[str],
        budget: int,
        at: int,
        cursor: str,
        task_ids: Sequence[str],
    ) -> BrokerSlice:
        """``unacked``: kombu's hash; ``queues``: the queue lists; ``budget``: the most
        entries read; ``at``/``cursor``: where to go on (ScanPlace.FIRST and '0' to start)."""
        next_at, next_cursor, found, tags = self.run(
            [unacked, *queues], [budget, int(at), cursor, len(queues), len(task_ids), *task_ids]
        )
        held = {str(tags[i]): str(tags[i + 1]) for i in range(0, len(tags), 2)}
        return BrokerSlice(frozenset(map(str, found)), int(next_at), str(next_cursor), held)
