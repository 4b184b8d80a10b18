"""The campaign's Lua scripts, one typed wrapper each: the only Python that knows their
KEYS and ARGV (``lua/campaign_*.lua``).

A tick's two round trips (:class:`Claim`, then :class:`AfterBatch`), the batch's turn at the
rate limit and the gates between them (:class:`Turns`), and the fenced claims of a
callback (:class:`TakeUnsent`), of a chain's next run (:class:`TickNext`) and of the
report's dispatch (:class:`ClaimReport`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from smsbat_tracker.store.scripts import Script

__all__ = [
    "AfterBatch",
    "AfterBatchReply",
    "Claim",
    "ClaimCode",
    "ClaimReport",
    "ClaimReportCode",
    "ClaimedMessage",
    "Final",
    "TakeUnsent",
    "TakeUnsentCode",
    "TickNext",
    "TickNextCode",
    "Turn",
    "Turns",
    "TurnsCode",
]


class ClaimCode(enum.IntEnum):
    """What ``campaign_claim.lua`` did."""

    TAKEN_OVER = 0  # the chain's run was taken over: nothing claimed
    CLAIMED = 1


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """One claimed message and what the rules need of it."""

    message_id: str
    due_at: float  # when it fell due (epoch seconds)
    cached: str  # its raw status cache entry, '' when none
    checks: int  # checks so far
    failures: int  # requests failed in a row
    pushed: bool  # a push was seen for it (the campaign trusts pushes for it from then on)


class Claim(Script):
    """``campaign_claim.lua``: claim one batch of due messages (a tick's first round trip)."""

    file = "campaign_claim.lua"

    def __call__(
        self,
        *,
        due_key: str,
        checks_key: str,
        claimed_key: str,
        meta_key: str,
        now: float,
        limit: int,
        lease_until: float,
        status_head: str,
        status_tail: str,
        chain_field: str,
        run: str,
    ) -> list[ClaimedMessage]:
        """The claimed messages, oldest due first (none for a run taken over)."""
        code, claimed, cached, checks, failures, pushed = self.run(
            [due_key, checks_key, claimed_key, meta_key],
            [repr(now), limit, repr(lease_until), status_head, status_tail, chain_field, run],
        )
        if ClaimCode(int(code)) is ClaimCode.TAKEN_OVER:
            return []
        return [
            ClaimedMessage(str(m), float(at), str(raw), int(n), int(f), p == "1")
            for m, at, raw, n, f, p in zip(
                claimed[::2], claimed[1::2], cached, checks, failures, pushed, strict=True
            )
        ]


class TurnsCode(enum.IntEnum):
    """Whether ``campaign_turns.lua`` booked the batch's tokens."""

    DEFERRED = 0  # no turn yet: the batch is back in the due set
    BOOKED = 1


@dataclass(frozen=True, slots=True)
class Turn:
    """A batch's turn: ``booked`` from ``wait_us`` on (or due again then), and which
    messages' gates were taken."""

    booked: bool
    wait_us: int
    gates: list[bool]


class Turns(Script):
    """``campaign_turns.lua``: book a batch's tokens, then take each message's gate."""

    file = "campaign_turns.lua"

    def __call__(
        self,
        *,
        rate_keys: Sequence[str],
        due_key: str,
        gate_keys: Sequence[str],
        limited: bool,
        gate_ms: int,
        reserve_args: Sequence[Any],
        messages: Sequence[tuple[str, float]],
        ticket_key: str = "",
        ticket_grace: float = 0.0,
    ) -> Turn:
        """``rate_keys``: RateLimiter.keys; ``reserve_args``: RateLimiter.script_args;
        ``gate_keys``: each message's gate, in the order of ``messages`` (id, due time).
        ``ticket_key``: the tick chain's ticket ('' for a tick outside a chain, which holds
        none), taken up to ``ticket_grace`` seconds after its tokens came due."""
        if len(gate_keys) != len(messages):
            raise ValueError("one gate key per message")
        args: list[Any] = [
            "1" if limited else "",
            gate_ms,
            *reserve_args,
            "1" if ticket_key else "",
            int(ticket_grace * 1_000_000),
            len(messages),
        ]
        for message_id, due_at in messages:
            args += [message_id, repr(due_at)]
        keys = [*rate_keys, due_key, ticket_key or due_key, *gate_keys]
        code, wait_us, gates = self.run(keys, args)
        return Turn(
            TurnsCode(int(code)) is TurnsCode.BOOKED, int(wait_us), [bool(int(g)) for g in gates]
        )


@dataclass(frozen=True, slots=True)
class Final:
    """An outcome to record: the message, its outcome, its compact record."""

    message_id: str
    outcome: str
    record: str


@dataclass(frozen=True, slots=True)
class AfterBatchReply:
    """What ``campaign_after_batch.lua`` did and left."""

    recorded: list[str]  # the ids this call recorded (their callbacks are this tick's)
    left: int  # messages left in the due set
    first_due: float | None  # when the first of them is due
    paused: bool  # every caller was paused (a 429)


class AfterBatch(Script):
    """``campaign_after_batch.lua``: a batch's after-step in one round trip."""

    file = "campaign_after_batch.lua"

    def __call__(
        self,
        *,
        checks_key: str,
        due_key: str,
        outcomes_key: str,
        meta_key: str,
        unsent_key: str,
        pause_key: str,
        claimed_key: str,
        final_ttl_ms: int,
        stamp: str,
        pause_ms: int | None,
        chain_field: str,
        run: str,
        stores: dict[str, list[Any]],
        rescored: dict[str, float],
        counted: Sequence[str],
        failed: Sequence[str],
        pushed: Sequence[str],
        finals: Sequence[Final],
    ) -> AfterBatchReply:
        """``stores``: each answer's status key -> StatusCache.store_args; ``rescored``:
        id -> next check time; ``stamp``: '' when nobody wants per-message callbacks;
        ``chain_field``: '' for no chain."""
        store_argc = {len(a) for a in stores.values()}
        if len(store_argc) > 1:
            raise ValueError("every store takes as many arguments")
        args: list[Any] = [
            final_ttl_ms,
            stamp,
            "" if pause_ms is None else pause_ms,
            chain_field,
            run,
            store_argc.pop() if store_argc else 0,
            len(stores),
            len(rescored),
            len(counted),
            len(failed),
            len(pushed),
            len(finals),
        ]
        for store_args in stores.values():
            args += store_args
        for message_id, at in rescored.items():
            args += [message_id, repr(at)]
        args += [*counted, *failed, *pushed]
        for final in finals:
            args += [final.message_id, final.outcome, final.record]
        keys = [checks_key, due_key, outcomes_key, meta_key, unsent_key, pause_key, claimed_key]
        recorded, left, head, paused = self.run([*keys, *stores], args)
        return AfterBatchReply(
            [str(m) for m in recorded], int(left), float(head) if head else None, bool(paused)
        )


class TakeUnsentCode(enum.IntEnum):
    """Whether ``campaign_take_unsent.lua`` took the callback."""

    GONE = 0  # another tick took it since
    TAKEN = 1


class TakeUnsent(Script):
    """``campaign_take_unsent.lua``: take a per-message callback to send."""

    file = "campaign_take_unsent.lua"

    def __call__(
        self, *, unsent_key: str, message_id: str, stamp: str, new_stamp: int
    ) -> TakeUnsentCode:
        return TakeUnsentCode(int(self.run([unsent_key], [message_id, stamp, new_stamp])))


class TickNextCode(enum.IntEnum):
    """Whether ``campaign_tick_next.lua`` moved the chain on."""

    TAKEN_OVER = 0
    MOVED = 1


class TickNext(Script):
    """``campaign_tick_next.lua``: move a tick chain on to its next run, fenced."""

    file = "campaign_tick_next.lua"

    def __call__(
        self,
        *,
        meta_key: str,
        due_index: str,
        chain_field: str,
        run: str,
        next_run: str,
        member: str,
        next_due: float,
    ) -> TickNextCode:
        return TickNextCode(
            int(
                self.run(
                    [meta_key, due_index], [chain_field, run, next_run, member, repr(next_due)]
                )
            )
        )


class ClaimReportCode(enum.IntEnum):
    """What ``campaign_claim_report.lua`` did."""

    HELD = 0  # sent, or freshly claimed by another
    CLAIMED = 1
    RETIRED = 2  # sent and nothing unsent: the chains left the due index
    RECLAIMED = 3  # taken over from a sender that stopped (it may have sent it)


class ClaimReport(Script):
    """``campaign_claim_report.lua``: claim the report's dispatch (or retire the chains)."""

    file = "campaign_claim_report.lua"

    def __call__(
        self,
        *,
        meta_key: str,
        unsent_key: str,
        due_index: str,
        now_ms: int,
        stale_ms: int,
        members: Sequence[str],
    ) -> ClaimReportCode:
        """``members``: the campaign's chains' due index members."""
        return ClaimReportCode(
            int(
                self.run(
                    [meta_key, unsent_key, due_index], [now_ms, stale_ms, len(members), *members]
                )
            )
        )
