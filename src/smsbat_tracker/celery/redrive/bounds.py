"""The re-driver's pace, and the most work one Redis call of it may do.

No call the re-driver makes grows with a backlog (the due index, a dead worker's held
tasks, a claimed batch): each takes at most one of these bounds' worth, and Python loops.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

__all__ = [
    "GONE_AFTER",
    "HANDED_AFTER",
    "HEARTBEAT",
    "HELD_CHUNK",
    "LOCK_MS",
    "NOTE_EVERY",
    "ORPHAN_AFTER",
    "OUTAGE_GRACE",
    "RAN_FOR",
    "REFRESH_CHUNK",
    "RELEASE_CHUNK",
    "RESEND_LIMIT",
    "SUPERSEDED_FOR",
    "SWEEP_LIMIT",
    "chunked",
]

# How often each worker refreshes what it holds, and sweeps when it has the lock.
HEARTBEAT: Final = 1.0
# A worker whose connections to Redis all closed (its process died: a SIGKILL, an OOM
# kill, a crash) is gone once it has missed this long of beats, on the server's clock:
# what it held goes back then instead of after SMSBAT_REDRIVE_AFTER. Longer than a beat
# and its reconnection, so that a live worker whose connection was cut beats again first;
# a frozen one keeps its connections and waits SMSBAT_REDRIVE_AFTER (see dead.py).
GONE_AFTER: Final = 1.5 * HEARTBEAT
# A tracker run a worker fetched is in its held set within this long (one command for
# every run fetched meanwhile; other tasks are noted at once): a worker found gone has
# little in hand that only the due index, behind the queue's backlog, would bring back.
NOTE_EVERY: Final = 0.1
# Trackings re-driven in one sweep at most (and dead workers, follow-ups, and a dead
# worker's tasks looked at): a mass loss resumes over a few seconds instead of flooding
# the queue, and no read of the due index grows with it.
SWEEP_LIMIT: Final = 200
# After an outage a worker beats this long before it sweeps: every live worker has beaten
# again by then (each beats once a second).
OUTAGE_GRACE: Final = 2 * HEARTBEAT
# A follow-up lost before any worker received it is sent again at most this often.
RESEND_LIMIT: Final = 3
# A follow-up fetched this long ago, unacknowledged and never noted received, that no live
# worker holds is given back (follow_ups.py). Its fetcher died between kombu's fetch and
# the note of its receipt (a worker notes at once what it fetches; killed in between, it
# leaves the task in no held set); or a live worker's note was lost with Redis, and its
# first beat back names the task again: a sweep comes only OUTAGE_GRACE after the
# sweeper's own outage. Longer than that and a reconnection (0.25-1 s); a worker that
# holds the task anyway (its beats stopped longer, as a frozen one's) finds its copy
# superseded (.fence). Was 30 s: a callback fetched by a worker killed in that window
# came 44 s late in a crash run.
ORPHAN_AFTER: Final = 10.0
# The tasks a worker that stopped beating had handed to its pool go back only once it is
# found gone (its process died) or this long after its last beat: a frozen worker runs
# them when it wakes up (Celery asks revoked() only before the hand-off), so giving them
# back sooner would run them twice. A node lost with its connections open (a power cut)
# delays them by this much.
HANDED_AFTER: Final = 60.0
# A delivery given back under a new tag is remembered this long (Keys.superseded): a
# worker frozen longer than this, holding the old copy, would run it when it wakes up.
SUPERSEDED_FOR: Final = 86_400.0
# A follow-up that ran is remembered this long (Keys.ran): longer than a failover, a
# give-back of an orphan (ORPHAN_AFTER) or a backlog that a copy brought back by either
# could wait behind; short enough to cost little memory (one small key a follow-up).
RAN_FOR: Final = 600.0
# The sweep lock outlives a sweep, and expires soon after its holder dies.
LOCK_MS: Final = 5_000
# Held tracker tasks whose due entries one refresh script call looks at.
REFRESH_CHUNK: Final = 100
# Delivery tags one command of the heartbeat writes or reads (a worker may hold thousands
# of countdowns).
HELD_CHUNK: Final = 500
# Claimed messages of a taken-over tick chain one call puts back in its campaign's due set.
RELEASE_CHUNK: Final = 500

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size``."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
