"""This worker's heartbeat and the broker delivery tags of what it holds, in Redis.

Each second a worker notes in its *held set* (``Keys.held(holder)``) the delivery tags of
every task it holds (countdowns, callbacks, anything), and beats in ``Keys.holders()``.
When it stops beating, the others give back what it held (:mod:`.dead`). A task it held
and no longer holds, still unacked a beat later, was either run here and its
acknowledgement lost (made on a channel a lost connection closed, or on a master that
died before passing it on): it acknowledges that one again; or dropped by the consumer (a
lost connection drops the countdowns it held): it gives that back itself. A task received
between two beats is noted at once (:meth:`HeldRegistry.note_received`), and a follow-up
task the tracker sent is marked received (see :mod:`.follow_ups`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Final

import redis
from celery.exceptions import ImproperlyConfigured

from smsbat_tracker.celery.compat.kombu_qos import (
    forget_acks_before,
    left_for_requeue,
    make_deferred_acks,
    replay_acks_since,
)
from smsbat_tracker.celery.names import DUE_INDEXED
from smsbat_tracker.celery.redrive.bounds import HANDED_AFTER, HEARTBEAT, HELD_CHUNK, chunked
from smsbat_tracker.celery.redrive.giveback import GiveBack
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import Beat, Beaten

__all__ = [
    "HeldRegistry",
    "connection_name",
    "consumed_queues",
    "fenced_by_token",
    "handed_to_pool",
    "held_requests",
    "ran_here",
    "request_tag",
    "running_requests",
]

log = get_logger(__name__)

# How long before the last beat that reached Redis an acknowledgement may still be missing
# from a replica that a failover promotes (replication is asynchronous, and normally well
# under this): those are made again at the first beat after an outage.
REPLICA_LAG: Final = HEARTBEAT


def connection_name(holder: str) -> str:
    """The name (``CLIENT SETNAME``) of the re-driver connections of worker ``holder``: the
    others read in ``CLIENT LIST`` whether any is still open (see :mod:`.dead`)."""
    return f"smsbat-redriver-{holder}"


def held_requests() -> tuple[list[Any], list[Any]]:
    """This process's requests: (reserved or active, scheduled), copied at one moment.

    Reserved requests are due and wait for the pool; scheduled ones are the countdowns it
    holds until they are due (kept apart by Celery >= 5.7).
    """
    from celery.worker import state

    while True:
        try:
            due = list(state.reserved_requests) + list(state.active_requests)
            scheduled = list(getattr(state, "scheduled_requests", ()))
        except RuntimeError:  # a set changed while being copied: copy again
            continue
        return due, scheduled


def running_requests() -> list[Any]:
    """This process's requests that a pool process runs now."""
    from celery.worker import state

    while True:
        with contextlib.suppress(RuntimeError):  # changed while being copied: copy again
            return list(state.active_requests)


def fenced_by_token(request: Any) -> bool:
    """Whether a copy of ``request`` that runs after another stops by itself: a tracking's
    run (its session's token) or a campaign tick (its chain's run)."""
    return getattr(request, "name", None) in DUE_INDEXED


def handed_to_pool(request: Any) -> bool:
    """Whether this worker handed ``request`` to its pool (``execute_using_pool``, after
    Celery's ``revoked()`` check) or a pool process started it: it runs even after a freeze."""
    return (
        getattr(request, "_apply_result", None) is not None
        or getattr(request, "time_start", None) is not None
    )


def request_tag(request: Any) -> str | None:
    """The broker delivery tag of a request (its entry in kombu's unacked hash)."""
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    return None if tag is None else str(tag)


def ran_here(request: Any) -> bool:
    """Whether this worker's pool took the request (Celery's ``on_accepted``: it has a
    start time), or Celery acknowledged or rejected it: either way, not one to run again."""
    if request is None:
        return False
    return getattr(request, "time_start", None) is not None or bool(
        getattr(request, "acknowledged", False)
    )


def _headers(request: Any) -> dict[str, Any]:
    return dict(getattr(getattr(request, "message", None), "headers", None) or {})


def consumed_queues(app: Any) -> list[str]:
    """The queues this worker consumes (``-Q``, else every queue the app knows).

    Empty (logged) when the app's queue configuration cannot be read: the receipts of
    follow-ups sent to this worker's queues are then not watched (see :mod:`.follow_ups`).
    """
    try:
        queues = app.amqp.queues
        return sorted(str(q) for q in (queues.consume_from or queues))
    except (AttributeError, KeyError, TypeError, ValueError, ImproperlyConfigured) as exc:
        log.warning("redrive.queues_unknown", error=f"{type(exc).__name__}: {exc}"[:200])
        return []


class HeldRegistry:
    """One worker's held set and heartbeat."""

    def __init__(self, tracker: Tracker, client: redis.Redis, holder: str) -> None:
        self.tracker = tracker
        self.redis = client
        self.holder = holder
        self.keys = Keys(tracker.settings.key_prefix)
        self.giveback = GiveBack(tracker, client)
        self._lock = threading.Lock()
        self._noted: set[str] = set()  # the tags the held set has, as far as we know
        self._received: dict[str, float] = {}  # tags noted at receipt -> when
        self._pending: list[str] = []  # received, to be noted by flush_received
        # Tags handed to the pool that a token does not fence (see note_handed); those
        # not written to Redis yet.
        self._handed: set[str] = set()
        self._handed_pending: list[str] = []
        self._gone: set[str] = set()  # tags no longer held at the last beat
        # The requests behind the tags noted and gone: whether this worker ran one decides
        # between acknowledging it again and giving it back.
        self._requests: dict[str, Any] = {}
        self._last_beat: float | None = None  # when the last beat that reached Redis began
        self._beat_failed = False  # the last beat did not reach Redis
        self._queues = consumed_queues(tracker.app)
        # Whether this worker's connections carry its name (see .dead): only then can the
        # others find it gone by its closed connections.
        options = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        self.named = options.get("client_name") == connection_name(holder)
        self._beat = Beat(client)
        # What the last beat that reached Redis found (None before the first).
        self.beaten: Beaten | None = None

    def note_received(self, request: Any, *, at_once: bool = True) -> None:
        """Note a task this worker just fetched (Celery's ``task_received``): at once, or
        with the next :meth:`flush_received` (``at_once=False``: a tracker run, noted
        within :data:`.NOTE_EVERY` in one command for many rather than a round trip each).

        The heartbeat notes everything held each second; this closes that second for a
        task fetched just before its worker dies, so that the others give it back when
        they find the worker dead (:mod:`.dead`).
        """
        tag = request_tag(request)
        if tag is not None:
            with self._lock:
                self._received[tag] = time.monotonic()
                self._requests[tag] = request
                if not at_once:
                    self._pending.append(tag)
                    return
        pipe = self.redis.pipeline(transaction=False)
        if tag is not None:
            pipe.sadd(self.keys.held(self.holder), tag)
        task_id = getattr(request, "id", None)
        if task_id:
            self._note_receipts(pipe, [str(task_id)])
        if len(pipe):
            pipe.execute()

    def note_handed(self, request: Any) -> None:
        """A task about to be handed to the pool (Celery asked ``revoked()``, the fence said
        no): unless a token fences it, it is noted apart with the next
        :meth:`flush_received`. Should this worker freeze, the others leave it to this
        worker rather than give it back (:mod:`.dead`): it would run here on waking up,
        past any check, and the copy given back would run too."""
        tag = request_tag(request)
        if tag is None or fenced_by_token(request):
            return
        with self._lock:
            self._handed.add(tag)
            self._handed_pending.append(tag)

    def flush_received(self) -> int:
        """Note the tags received with ``at_once=False``, and those handed to the pool,
        since the last call; how many were received.

        Raises :class:`redis.RedisError` (they are then noted by the next beat, which
        notes every tag received and handed).
        """
        with self._lock:
            tags, self._pending = self._pending, []
            handed, self._handed_pending = self._handed_pending, []
        for chunk in chunked(tags, HELD_CHUNK):
            self.redis.sadd(self.keys.held(self.holder), *chunk)
        if handed:
            self.redis.sadd(self.keys.held_handed(self.holder), *handed)
        return len(tags)

    def _note_receipts(self, pipe: Any, task_ids: list[str]) -> None:
        """A follow-up task the tracker sent has reached a worker (see :mod:`.follow_ups`)."""
        pipe.zrem(self.keys.unreceived(), *task_ids)
        pipe.hdel(self.keys.unreceived_sends(), *task_ids)

    def note_held(self, requests: list[Any], now: float) -> int:
        """Record this worker's heartbeat and the delivery tags of what it holds.

        A task it held and no longer holds was acknowledged, unless the consumer dropped
        it (a lost connection drops the countdowns it held): one still unacked a beat
        later (Celery forgets a finished task a moment before it acknowledges it) is given
        back to the queue. Returns how many were.
        """
        started = time.monotonic()
        # After an outage: the acknowledgements a dead master may not have passed on to the
        # one promoted are made again, and those made while Redis was away are made now,
        # before anything is given back.
        last = self._last_beat if self._beat_failed else None  # the beat before the outage
        outage = last is not None
        if last is not None:
            replay_acks_since(self.redis, last - REPLICA_LAG)
        self._beat_failed = True
        make_deferred_acks(self.redis)
        by_tag = {tag: r for r in requests if (tag := request_tag(r)) is not None}
        ids = {tag: str(getattr(r, "id", "")) for tag, r in by_tag.items()}
        held = set(ids)
        recent = time.monotonic() - 2 * HEARTBEAT
        with self._lock:
            # A tag noted at receipt after ``requests`` was read is still held. An older one
            # is noted from now on even if no beat reaches Redis (an outage): the consumer
            # may have dropped it with the connection, and it must be looked for when back.
            self._noted |= {t for t, at in self._received.items() if at <= recent}
            self._received = {t: at for t, at in self._received.items() if at > recent}
            keep = held | set(self._received)
            gone = self._noted - keep
            self._requests.update(by_tag)
            self._handed = (self._handed & keep) | {
                t for t, r in by_tag.items() if handed_to_pool(r) and not fenced_by_token(r)
            }
            handed = sorted(self._handed)
            self._handed_pending = []
        key = self.keys.held(self.holder)
        # Not a transaction: a worker holding thousands of countdowns writes them in bounded
        # commands. The beat comes last, so a sweep that sees it finds the held set written.
        # Named too: what was received while Redis was away (its note at receipt failed)
        # and what this beat will give back, so that the others find them should this
        # worker die first (else only the orphan sweep would, ORPHAN_AFTER later).
        pipe = self.redis.pipeline(transaction=False)
        for chunk in chunked(keep | gone, HELD_CHUNK):
            pipe.sadd(key, *chunk)
        new = [ids[t] for t in held - self._noted if ids[t]]
        for receipts in chunked(new, HELD_CHUNK):  # noted at receipt, unless Redis was away
            self._note_receipts(pipe, receipts)
        if self._queues:
            pipe.hset(self.keys.worker_queues(), mapping=dict.fromkeys(self._queues, repr(now)))
        # Outlives the holder long enough for a sweep to read it after its death.
        ttl_ms = int(max(2 * HANDED_AFTER, 10 * self.tracker.settings.redrive_after) * 1000)
        pipe.pexpire(key, ttl_ms)
        # What it has handed to its pool, written whole (a finished task leaves it).
        handed_key = self.keys.held_handed(self.holder)
        pipe.delete(handed_key)
        for chunk in chunked(handed, HELD_CHUNK):
            pipe.sadd(handed_key, *chunk)
        if handed:
            pipe.pexpire(handed_key, ttl_ms)
        self._beat(
            self.keys.holders(), self.keys.beats(), self.holder, now, named=self.named, client=pipe
        )
        self.beaten = Beat.parse(pipe.execute()[-1])
        self._beat_failed, self._last_beat = False, started
        forget_acks_before(started - REPLICA_LAG)
        # A tag leaves the held set only once it is acknowledged or given back: should this
        # worker die in between, the sweep of the dead still finds it. After an outage the
        # consumer dropped what it held (a lost connection), and what finished meanwhile
        # was acknowledged above: what is gone is settled now rather than a beat later
        # (what this worker's pool took is acknowledged again, never given back).
        suspects = (self._gone | gone if outage else self._gone) - keep
        restored = self._settle_suspects(suspects) if suspects else 0
        for chunk in chunked(suspects, HELD_CHUNK):
            self.redis.srem(key, *chunk)
        with self._lock:
            self._gone, self._noted = (gone - suspects), keep
            live = keep | gone | set(self._received)
            self._requests = {t: r for t, r in self._requests.items() if t in live}
        return restored

    def _settle_suspects(self, suspects: set[str]) -> int:
        """Tags held before, no longer held, and maybe still unacked: one whose task this
        worker's pool took (Celery acknowledges at that moment, or after the run) is
        acknowledged again, never run twice; any other was dropped with a lost connection,
        and is given back. Returns how many were given back."""
        with self._lock:
            requests = {tag: self._requests.get(tag) for tag in suspects}
        ran = {
            tag: (str(getattr(r, "id", "")), _headers(r))
            for tag, r in requests.items()
            if ran_here(r) and not left_for_requeue(tag)
        }
        if ran:
            self.giveback.ack_again(ran, "redrive.acked_again")
        dropped = sorted(suspects - set(ran))
        if not dropped:
            return 0
        task_ids = [str(getattr(requests[t], "id", "")) for t in dropped if requests[t]][:20]
        return self.giveback.restore(dropped, "redrive.restored_dropped", task_ids=task_ids)

    def retire(self, now: float) -> None:
        """A stop: this worker's last beat. Celery gives back what it held when it closes
        its channel, and the held set is forgotten as soon as nothing in it is unacked. A
        stop that could not give everything back (Redis away, an unrecoverable error)
        leaves it to the other workers' sweep, like a dead worker's, a re-drive bound on.
        """
        key = self.keys.held(self.holder)
        for chunk in chunked(self.redis.sscan_iter(key, count=HELD_CHUNK), HELD_CHUNK):
            if self.giveback.still_unacked(str(tag) for tag in chunk):
                self.redis.zadd(self.keys.holders(), {self.holder: now})
                return
        self.redis.unlink(key)  # freed in the background, however many tags it had
        self.redis.unlink(self.keys.held_handed(self.holder))
        self.redis.zrem(self.keys.holders(), self.holder)
        self.redis.zrem(self.keys.beats(), self.holder)
