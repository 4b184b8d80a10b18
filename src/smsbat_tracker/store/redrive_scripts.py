"""The re-driver's Lua scripts, typed: each call lays out KEYS and ARGV in one place.

The re-driver (:mod:`smsbat_tracker.celery.redrive`) keeps in-flight trackings alive in the
*due index* and takes lost ones over; these wrappers are the only Python that knows the
scripts' argument order (``lua/redrive_*.lua``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis

from smsbat_tracker.store.scripts import Script

__all__ = [
    "Beat",
    "Beaten",
    "ClaimResend",
    "Gone",
    "HeldEntry",
    "RefreshHeld",
    "ReleaseBatch",
    "Resend",
    "SessionTake",
    "Take",
    "TakeChain",
    "TakeSession",
    "Unlock",
    "Unlocked",
]


class Take(enum.IntEnum):
    """What taking a tracking over found (``redrive_take_*.lua``)."""

    TAKEN = 1  # taken over: publish its fresh run
    MOVED = 0  # no longer overdue: not lost after all
    GONE = -1  # the tracking is gone: its entry was dropped


class Unlocked(enum.IntEnum):
    """What releasing the sweep lock found (``redrive_unlock.lua``)."""

    RELEASED = 1
    NOT_HELD = 0  # expired, or held by another worker


class Resend(enum.IntEnum):
    """What claiming a follow-up's sending again found (``redrive_resend.lua``)."""

    CLAIMED = 1
    CHANGED = 0  # its entry changed since the sweep read it: sent meanwhile, or received


class HeldEntry(NamedTuple):
    """One held tracker task's due entry and the token it carries."""

    member: str  # its due index member (``m:<message id>`` or ``c:<campaign id>:<slot>``)
    hash_key: str  # its tracking's hash: the session, or the campaign's
    field: str  # the field that holds the token: ``owner`` or ``tick:<slot>``
    token: str  # the token the task carries: its task id, or the chain's run
    run: str  # the session run it carries ('' for a chain)


class SessionTake(NamedTuple):
    """A session take-over: the result, and the session's start, deadline, when its lost
    run fell due (None: not known) and that run's task id if taken."""

    result: Take
    started_at: float = 0.0
    deadline_at: float = 0.0
    due_at: float | None = None
    previous: str = ""


class Beaten(NamedTuple):
    """What one heartbeat found: its previous holders score (None: it had none; 0: another
    worker found it gone) and the server's time at the beat."""

    previous: float | None
    served: float


class Beat(Script):
    """``redrive_beat.lua``: one worker's heartbeat, on its clock and on the server's."""

    file = "redrive_beat.lua"

    def __call__(
        self,
        holders: str,
        beats: str,
        holder: str,
        now: float,
        *,
        named: bool,
        client: redis.Redis | redis.client.Pipeline | None = None,
    ) -> Any:
        """Run the beat (on ``client``, a pipeline, when given: :meth:`parse` reads what
        it returned)."""
        return self.run([holders, beats], [holder, repr(now), int(named)], client=client)

    @staticmethod
    def parse(raw: Sequence[Any]) -> Beaten:
        """The :class:`Beaten` of what :meth:`__call__` returned."""
        previous, served = (str(x) if not isinstance(x, bytes) else x.decode() for x in raw)
        return Beaten(float(previous) if previous else None, float(served))


class Gone(Script):
    """``redrive_gone.lua``: declare gone the named holders with no connection left that
    last beat ``gone_after`` or more ago (and no earlier than ``since``), on the server's
    clock; returns them."""

    file = "redrive_gone.lua"

    def __call__(
        self, holders: str, beats: str, candidates: Sequence[str], gone_after: float, since: float
    ) -> list[str]:
        if not candidates:
            return []
        found = self.run([holders, beats], [repr(gone_after), repr(since), *candidates])
        return [x.decode() if isinstance(x, bytes) else str(x) for x in found]


class RefreshHeld(Script):
    """``redrive_refresh.lua``: mark alive the overdue entries of held tasks whose token
    still matches; how many were."""

    file = "redrive_refresh.lua"

    def __call__(self, due: str, now: float, entries: Sequence[HeldEntry]) -> int:
        if not entries:
            return 0
        keys = [due, *(entry.hash_key for entry in entries)]
        args: list[Any] = [repr(now), len(entries)]
        for entry in entries:
            args += [entry.member, entry.field, entry.token, entry.run]
        return int(self.run(keys, args))


class TakeSession(Script):
    """``redrive_take_session.lua``: take a lost session over with a new owner."""

    file = "redrive_take_session.lua"

    def __call__(
        self, due: str, session: str, member: str, cutoff: float, owner: str, now: float
    ) -> SessionTake:
        taken = self.run([due, session], [member, repr(cutoff), owner, repr(now)])
        if isinstance(taken, list):
            due_at = taken[3] if len(taken) > 3 else ""
            return SessionTake(
                Take(int(taken[0])),
                float(taken[1]),
                float(taken[2]),
                float(due_at) if due_at else None,
                str(taken[4]) if len(taken) > 4 else "",
            )
        return SessionTake(Take(int(taken)))


class TakeChain(Script):
    """``redrive_take_chain.lua``: take a lost tick chain over with a new run."""

    file = "redrive_take_chain.lua"

    def __call__(
        self, due: str, meta: str, member: str, cutoff: float, field: str, run: str, now: float
    ) -> Take:
        return Take(int(self.run([due, meta], [member, repr(cutoff), field, run, repr(now)])))


class ReleaseBatch(Script):
    """``redrive_release_batch.lua``: put back at most ``limit`` claimed messages, each
    due when it fell due (``now`` for a batch noted without due times); how many are left."""

    file = "redrive_release_batch.lua"

    def __call__(self, campaign_due: str, claimed: str, now: float, limit: int) -> int:
        return int(self.run([campaign_due, claimed], [repr(now), limit]))


class Unlock(Script):
    """``redrive_unlock.lua``: release the sweep lock if ``holder`` still holds it."""

    file = "redrive_unlock.lua"

    def __call__(self, lock: str, holder: str) -> Unlocked:
        return Unlocked(int(self.run([lock], [holder])))


class ClaimResend(Script):
    """``redrive_resend.lua``: claim the sending again of a lost follow-up, if its entry is
    still the one read."""

    file = "redrive_resend.lua"

    def __call__(
        self, sends: str, index: str, task_id: str, *, read: str, entry: str, now: float
    ) -> Resend:
        return Resend(int(self.run([sends, index], [task_id, read, entry, repr(now)])))
