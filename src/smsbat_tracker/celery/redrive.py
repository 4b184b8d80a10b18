"""The re-driver: in-flight trackings resume within seconds after a worker or Redis crash.

Every in-flight tracking has an entry in one Redis sorted set, the *due index*
(:meth:`~smsbat_tracker.store.keys.Keys.due`), scored by the time its next run is due: each
``track_message`` session (``m:<message id>``) and each campaign tick chain
(``c:<campaign id>:<slot>``). The step that records a check writes the entry in the same
Lua script, fenced by the tracking's token: the session's owner task id and the run it
expects next, or the chain's ``run``.

Celery on Redis holds a waiting countdown task in the worker that fetched it, and kombu
gives it back only after the visibility timeout (an hour): a SIGKILLed worker, or a Redis
restart (the consumer drops what it holds), would leave its trackings that long. Instead,
each worker runs :class:`Redriver` on a thread (started by the :class:`RedriveStep`
bootstep, so there is nothing more to run):

- every second it *refreshes* the entries of the tracker tasks its own process holds and
  that are due or running (Celery's reserved and active requests): a tracking waiting for
  a busy pool, or a long check, is alive and never looks overdue; and it notes the
  broker delivery tags of every task it holds (countdowns, callbacks, anything);
- under a Redis lock, one worker at a time *sweeps*: an entry overdue by more than
  ``SMSBAT_REDRIVE_AFTER`` is neither held by a live worker (it would be refreshed) nor
  waiting in the broker queue (see :meth:`Redriver.queue_age`), so it was lost. The
  sweep takes it over with a new token and publishes a fresh run, at most
  :data:`SWEEP_LIMIT` a sweep. The lost task, should it ever come back, finds its token
  moved and stops without an API call or a callback. The same sweep gives back to the
  queue, with kombu's own ``restore_by_tag``, the tasks a worker held when it stopped
  beating for ``SMSBAT_REDRIVE_AFTER``: callbacks and the countdowns it held come back at
  once instead of after the visibility timeout. Tasks held by workers that do not run
  this bootstep are never touched.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from typing import Any, Final

import redis
from celery import bootsteps, signals

from smsbat_tracker import metrics
from smsbat_tracker.celery.names import (
    DUE_INDEXED,
    PUBLISHED_AT,
    TICK_TASK,
    TRACK_PRIORITY,
    TRACK_TASK,
)
from smsbat_tracker.celery.tracker import Tracker, find_tracker, tracker_of
from smsbat_tracker.engine.tracking import routed_queue
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.store.keys import Keys, kombu_queue_list

__all__ = ["HEARTBEAT", "SWEEP_LIMIT", "RedriveStep", "Redriver"]

log = get_logger(__name__)

# How often each worker refreshes what it holds, and sweeps when it has the lock.
HEARTBEAT: Final = 1.0
# Trackings re-driven in one sweep at most: a mass loss resumes over a few seconds
# instead of flooding the queue.
SWEEP_LIMIT: Final = 200
# After an outage a worker beats this long before it sweeps: every live worker has beaten
# again by then (each beats once a second).
OUTAGE_GRACE: Final = 2 * HEARTBEAT
# A follow-up lost before any worker received it is sent again at most this often.
RESEND_LIMIT: Final = 3
# The sweep lock outlives a sweep, and expires soon after its holder dies.
LOCK_MS: Final = 5_000

# KEYS: due, then one hash per item.  ARGV: now, then member, field, expected value,
# expected run ('' for none) per item.  Refreshes the overdue entries whose token still
# matches: their task is held by a live worker.
_REFRESH = """
local now = tonumber(ARGV[1])
local n = 0
for i = 2, #KEYS do
  local a = 2 + (i - 2) * 4
  local ok
  if ARGV[a + 3] ~= '' then
    local v = redis.call('HMGET', KEYS[i], ARGV[a + 1], 'run')
    ok = v[1] == ARGV[a + 2] and tonumber(v[2]) == tonumber(ARGV[a + 3])
  else
    ok = redis.call('HGET', KEYS[i], ARGV[a + 1]) == ARGV[a + 2]
  end
  if ok then
    local score = redis.call('ZSCORE', KEYS[1], ARGV[a])
    if score and tonumber(score) < now then
      redis.call('ZADD', KEYS[1], now, ARGV[a])
      n = n + 1
    end
  end
end
return n
"""

# KEYS: due, session.  ARGV: member, cutoff, new owner, now.  Takes a lost session over:
# a new owner whose first run comes next. Returns {1, started_at, deadline_at}, 0 when the
# entry moved (not lost after all), -1 when the session is gone (entry dropped).
_TAKE_SESSION = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
local s = redis.call('HMGET', KEYS[2], 'started_at', 'deadline_at')
if not s[1] or not s[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
redis.call('HSET', KEYS[2], 'owner', ARGV[3], 'run', 0)
redis.call('HINCRBY', KEYS[2], 'redriven', 1)
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return {1, s[1], s[2]}
"""

# KEYS: due, campaign meta, campaign due set, the chain's claimed batch.  ARGV: member,
# cutoff, field, new run, now.  Takes a lost tick chain over, and puts the batch it had
# claimed back in the campaign's due set. Returns 1, 0 or -1 as _TAKE_SESSION.
_TAKE_CHAIN = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('HINCRBY', KEYS[2], 'redriven', 1)
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('ZADD', KEYS[3], 'XX', ARGV[5], id)
end
redis.call('DEL', KEYS[4])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
return 1
"""

# KEYS: lock.  ARGV: holder.  Releases the sweep lock if this worker still holds it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _held_item(request: Any, keys: Keys) -> tuple[str, str, str, str, str] | None:
    """(member, hash key, field, expected, run) for a tracker request held by this worker."""
    args = list(request.args or ())
    kwargs = dict(request.kwargs or {})
    if request.name == TRACK_TASK:
        message_id = kwargs.get("message_id", args[0] if args else None)
        if not isinstance(message_id, str):
            return None
        retries = int(request.request_dict.get("retries") or 0)
        return (
            Keys.due_message(message_id),
            keys.session(message_id),
            "owner",
            str(request.id),
            str(retries),
        )
    if request.name == TICK_TASK:
        campaign_id = kwargs.get("campaign_id", args[0] if args else None)
        slot, run = kwargs.get("slot"), kwargs.get("run")
        if not isinstance(campaign_id, str) or slot is None or not isinstance(run, str):
            return None
        return (
            Keys.due_tick(campaign_id, int(slot)),
            keys.campaign(campaign_id),
            f"tick:{slot}",
            run,
            "",
        )
    return None


def survive_broker_loss(client: redis.Redis | None = None) -> None:
    """Keep a worker alive, and its acknowledgements kept, when Redis goes away under it
    (celery 5.7 with kombu 5.7).

    On a lost connection the consumer closes it, and closing the channel gives its
    unacknowledged tasks back: kombu's Redis ``QoS.restore_unacked`` then builds a client
    from a connection already torn down and raises ``AttributeError``, which Celery does
    not ignore: "Unrecoverable error", and the worker exits. With Redis away nothing can
    be restored anyway; the tasks stay in kombu's ``unacked`` hash, and this worker's
    re-driver gives back those it no longer holds once Redis is back
    (:meth:`Redriver.note_held`).

    A task that was running meanwhile finishes after the reconnect and is acknowledged
    on the old channel: the same ``AttributeError`` again. Its acknowledgement is then
    made with ``client`` instead (the same two deletions kombu makes), so that the
    finished task is neither given back to run again nor the worker stopped. One that
    finishes while Redis is still away (a Sentinel failover takes seconds) cannot be
    acknowledged yet: its acknowledgement waits for the re-driver's first beat that
    reaches Redis (:func:`make_deferred_acks`), which makes it before giving anything back.
    """
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    if client is not None:
        _ACK_CLIENT["client"] = client
    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, "_smsbat_guarded", False):
        return
    original_restore, original_ack, original_reject = qos.restore_unacked, qos.ack, qos.reject

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original_restore(self, client)
        except AttributeError:
            log.warning("redrive.restore_on_close_failed", held=len(self._delivered))

    def ack(self: Any, delivery_tag: Any) -> None:
        try:
            original_ack(self, delivery_tag)
        except AttributeError:
            _ack_on_live_client(self, delivery_tag, virtual.QoS.ack)
        except (redis.ConnectionError, redis.TimeoutError):
            _defer_ack(self, delivery_tag, virtual.QoS.ack)

    def reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            original_reject(self, delivery_tag, requeue)
        except AttributeError:
            live = _ACK_CLIENT.get("client")
            if requeue:
                try:
                    if live is None:
                        raise redis.ConnectionError("no client") from None
                    self.restore_by_tag(delivery_tag, client=live, leftmost=True)
                except redis.RedisError:
                    virtual.QoS.ack(self, delivery_tag)  # unacked: the re-driver gives it back
                    return
            _ack_on_live_client(self, delivery_tag, virtual.QoS.ack)
        except (redis.ConnectionError, redis.TimeoutError):
            if requeue:
                virtual.QoS.ack(self, delivery_tag)  # unacked: the re-driver gives it back
            else:
                _defer_ack(self, delivery_tag, virtual.QoS.ack)

    restore_unacked._smsbat_guarded = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked  # type: ignore[method-assign]
    qos.ack = ack  # type: ignore[method-assign]
    qos.reject = reject  # type: ignore[method-assign]


# The client a torn-down channel's acknowledgements are made with (see survive_broker_loss).
_ACK_CLIENT: dict[str, redis.Redis] = {}


def _ack_on_live_client(qos: Any, delivery_tag: Any, forget: Any) -> None:
    client = _ACK_CLIENT.get("client")
    try:
        if client is None:
            raise redis.ConnectionError("no client")
        pipe = client.pipeline()
        pipe.zrem(qos.unacked_index_key, delivery_tag)
        pipe.hdel(qos.unacked_key, delivery_tag)
        pipe.execute()
    except redis.RedisError:
        _defer_ack(qos, delivery_tag, forget)
        return
    forget(qos, delivery_tag)


# Acknowledgements Redis was away for: delivery tag -> (kombu's unacked index, unacked
# hash). Made at the re-driver's next beat that reaches Redis; never given back meanwhile.
_DEFERRED_ACKS: dict[str, tuple[str, str]] = {}
_DEFERRED_LOCK = threading.Lock()


def _defer_ack(qos: Any, delivery_tag: Any, forget: Any) -> None:
    with _DEFERRED_LOCK:
        _DEFERRED_ACKS[str(delivery_tag)] = (qos.unacked_index_key, qos.unacked_key)
    log.warning("redrive.ack_deferred", tag=str(delivery_tag))
    forget(qos, delivery_tag)  # nor given back when the channel closes


def make_deferred_acks(client: redis.Redis) -> int:
    """Make the acknowledgements Redis was away for (see :func:`survive_broker_loss`);
    returns how many. Raises :class:`redis.RedisError` while Redis is still away."""
    with _DEFERRED_LOCK:
        deferred = dict(_DEFERRED_ACKS)
    if not deferred:
        return 0
    pipe = client.pipeline()
    for tag, (index, unacked) in deferred.items():
        pipe.zrem(index, tag)
        pipe.hdel(unacked, tag)
    pipe.execute()
    with _DEFERRED_LOCK:
        for tag in deferred:
            _DEFERRED_ACKS.pop(tag, None)
    log.info("redrive.acks_made", tasks=len(deferred))
    return len(deferred)


def _consumed_queues(app: Any) -> list[str]:
    """The queues this worker consumes (``-Q``, else every queue the app knows)."""
    with contextlib.suppress(Exception):
        queues = app.amqp.queues
        return sorted(str(q) for q in (queues.consume_from or queues))
    return []


def _tag(request: Any) -> str | None:
    """The broker delivery tag of a request (its entry in kombu's unacked hash)."""
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    return None if tag is None else str(tag)


class Redriver:
    """One worker's refresher and sweeper; :meth:`run_once` is one heartbeat."""

    def __init__(self, tracker: Tracker | Any, client: redis.Redis) -> None:
        # The tracker, or a Celery app that carries one.
        self.tracker: Tracker = tracker if isinstance(tracker, Tracker) else tracker_of(tracker)
        self.app = self.tracker.app
        self.settings = self.tracker.settings
        self.redis = client
        self.keys = Keys(self.settings.key_prefix)
        self.holder = uuid.uuid4().hex
        # Since when this worker has beaten without a break (None: not yet, or an outage).
        self.beating_since: float | None = None
        self._fresh = True  # no beat yet: a start-up, not an outage
        self._lock = threading.Lock()
        self._noted: set[str] = set()  # the tags the held set has, as far as we know
        self._received: dict[str, float] = {}  # tags noted at receipt -> when
        self._gone: set[str] = set()  # tags no longer held at the last beat
        self._refresh = client.register_script(_REFRESH)
        self._queues = _consumed_queues(self.app)
        self._take_session = client.register_script(_TAKE_SESSION)
        self._take_chain = client.register_script(_TAKE_CHAIN)
        self._unlock = client.register_script(_UNLOCK)

    # --- refreshing what this worker holds ---------------------------------------------

    @staticmethod
    def held_requests() -> tuple[list[Any], list[Any]]:
        """This process's requests: (reserved or active, scheduled), copied at one moment.

        Reserved requests are due and wait for the pool; scheduled ones are the countdowns
        it holds until they are due (kept apart by Celery >= 5.7).
        """
        from celery.worker import state

        while True:
            try:
                due = list(state.reserved_requests) + list(state.active_requests)
                scheduled = list(getattr(state, "scheduled_requests", ()))
            except RuntimeError:  # a set changed while being copied: copy again
                continue
            return due, scheduled

    @staticmethod
    def running_requests() -> list[Any]:
        """This process's requests that a pool process runs now."""
        from celery.worker import state

        while True:
            with contextlib.suppress(RuntimeError):  # changed while being copied: again
                return list(state.active_requests)

    def note_received(self, request: Any) -> None:
        """Note at once a task this worker just fetched (Celery's ``task_received``).

        The heartbeat notes everything held each second; this closes that second for a
        task fetched just before its worker dies.
        """
        tag = _tag(request)
        pipe = self.redis.pipeline(transaction=False)
        if tag is not None:
            with self._lock:
                self._received[tag] = time.monotonic()
            pipe.sadd(self.keys.held(self.holder), tag)
        task_id = getattr(request, "id", None)
        if task_id:
            self._note_receipts(pipe, [str(task_id)])
        if len(pipe):
            pipe.execute()

    def _note_receipts(self, pipe: Any, task_ids: list[str]) -> None:
        """A follow-up task the tracker sent has reached a worker (see ``resend_lost``)."""
        pipe.zrem(self.keys.unreceived(), *task_ids)
        pipe.hdel(self.keys.unreceived_sends(), *task_ids)

    def note_held(self, requests: list[Any], now: float) -> int:
        """Record this worker's heartbeat and the delivery tags of what it holds.

        A task it held and no longer holds was acknowledged, unless the consumer dropped
        it (a lost connection drops the countdowns it held): one still unacked a beat
        later (Celery forgets a finished task a moment before it acknowledges it) is given
        back to the queue. Returns how many were.
        """
        # Acknowledged while Redis was away: acknowledged now, before anything is given back.
        make_deferred_acks(self.redis)
        ids = {tag: str(getattr(r, "id", "")) for r in requests if (tag := _tag(r)) is not None}
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
        key = self.keys.held(self.holder)
        pipe = self.redis.pipeline(transaction=True)
        if held:
            pipe.sadd(key, *held)
        new = [ids[t] for t in held - self._noted if ids[t]]
        if new:  # noted at receipt already, unless Redis was away then
            self._note_receipts(pipe, new)
        if self._queues:
            pipe.hset(self.keys.worker_queues(), mapping=dict.fromkeys(self._queues, repr(now)))
        # Outlives the holder long enough for a sweep to read it after its death.
        pipe.pexpire(key, int(max(60.0, 10 * self.settings.redrive_after) * 1000))
        pipe.zadd(self.keys.holders(), {self.holder: now})
        pipe.execute()
        # A tag leaves the held set only once it is acknowledged or given back: should this
        # worker die in between, the sweep of the dead still finds it.
        suspects = self._gone - keep
        restored = self._restore(suspects, "redrive.restored_dropped") if suspects else 0
        if suspects:
            self.redis.srem(key, *suspects)
        with self._lock:
            self._gone, self._noted = gone, keep
        return restored

    def _restore(self, tags: set[str] | list[str], event: str, **fields: Any) -> int:
        """Give back the ``tags`` still unacked, with kombu's own ``restore_by_tag``."""
        restored = 0
        unacked = self.tracker.engine.unacked_key()
        left = [t for t, there in zip(tags, self._hexists(unacked, tags), strict=True) if there]
        if not left:
            return 0
        with self.app.connection_for_write() as connection:
            qos: Any = getattr(connection.default_channel, "qos")  # noqa: B009 - kombu's Redis QoS
            for tag in left:
                qos.restore_by_tag(tag, leftmost=True)
                restored += 1
        log.warning(event, tasks=restored, **fields)
        return restored

    def _hexists(self, key: str, tags: set[str] | list[str]) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.hexists(key, tag)
        return [bool(x) for x in pipe.execute()]

    def retire(self, now: float) -> None:
        """A stop: this worker's last beat. Celery gives back what it held when it closes
        its channel, and the held set is forgotten as soon as nothing in it is unacked. A
        stop that could not give everything back (Redis away, an unrecoverable error)
        leaves it to the other workers' sweep, like a dead worker's, a re-drive bound on.
        """
        key = self.keys.held(self.holder)
        tags = [str(t) for t in self.redis.smembers(key)]
        if tags and any(self._hexists(self.tracker.engine.unacked_key(), tags)):
            self.redis.zadd(self.keys.holders(), {self.holder: now})
            return
        self.redis.delete(key)
        self.redis.zrem(self.keys.holders(), self.holder)

    def restore_dead(self, now: float) -> int:
        """Give back to the queue what workers that stopped beating held; how many tasks.

        Only tags still unacked are restored, by kombu's own ``restore_by_tag`` (atomic
        under WATCH), so a task that a dead worker had acknowledged is never run again.
        """
        dead = self.redis.zrangebyscore(
            self.keys.holders(), "-inf", repr(now - self.settings.redrive_after)
        )
        restored = 0
        for holder in map(str, dead):
            key = self.keys.held(holder)
            tags = [str(t) for t in self.redis.srandmember(key, SWEEP_LIMIT) or []]
            if tags:
                restored += self._restore(tags, "redrive.restored", holder=holder)
                self.redis.srem(key, *tags)
            if not self.redis.scard(key):
                self.redis.zrem(self.keys.holders(), holder)
        return restored

    def refresh(self, requests: list[Any]) -> int:
        """Mark the due entries of ``requests`` alive now; returns how many were overdue."""
        items = {}
        for request in requests:
            item = _held_item(request, self.keys)
            if item is not None:
                items[item[0]] = item
        if not items:
            return 0
        keys = [self.keys.due()]
        args: list[Any] = [repr(time.time())]
        for member, hash_key, field, expected, run in items.values():
            keys.append(hash_key)
            args += [member, field, expected, run]
        return int(self._refresh(keys=keys, args=args))

    # --- sweeping ------------------------------------------------------------------------

    def queues(self) -> list[str]:
        """The broker lists the tracker's due-tracked tasks wait in (their priority's)."""
        name, route = routed_queue(self.app, TRACK_TASK)
        return [kombu_queue_list(name, int(route.get("priority") or TRACK_PRIORITY))]

    def queue_age(self, now: float) -> float:
        """How long the oldest tracker task waiting in the broker has waited (0: none).

        kombu pushes on the left of a list and workers pop from the right, so the right
        end is the oldest. A tracking overdue by less than this may be waiting behind a
        backlog that live workers are draining, so the sweep leaves it alone.
        """
        age = 0.0
        for queue in self.queues():
            raw = self.redis.lindex(queue, -1)
            if not raw:
                continue
            try:
                published = float(json.loads(raw)["headers"][PUBLISHED_AT])
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours (or an older version's): no age to read
            age = max(age, now - published)
        return age

    def sweep(self, now: float | None = None) -> int:
        """Re-drive lost trackings if this worker gets the lock; returns how many."""
        lock = self.keys.redrive_lock()
        if not self.redis.set(lock, self.holder, nx=True, px=LOCK_MS):
            return 0
        try:
            now = time.time() if now is None else now
            counts = metrics.get().redrives
            counts.labels("restored").inc(self.restore_dead(now))
            cutoff = now - self.settings.redrive_after - self.queue_age(now)
            counts.labels("follow_up").inc(self.resend_lost(cutoff, now))
            members = self.redis.zrangebyscore(
                self.keys.due(), "-inf", repr(cutoff), start=0, num=SWEEP_LIMIT
            )
            count = 0
            for member in members:
                count += self.redrive(str(member), cutoff, now)
            counts.labels("run").inc(count)
            if members:
                log.warning(
                    "redrive.sweep", overdue=len(members), redriven=count, cutoff=round(cutoff, 3)
                )
            return count
        finally:
            self._unlock(keys=[lock], args=[self.holder])

    def resend_lost(self, cutoff: float, now: float) -> int:
        """Send again the follow-up tasks sent before ``cutoff`` that no tracker worker has
        received and the broker no longer holds; returns how many.

        Kombu's Redis transport pops a message (``BRPOP``) before the worker records it as
        unacknowledged, so a worker killed with the reply unread loses it. A follow-up the
        tracker sent to a queue tracker workers consume stays in the ``unreceived`` index
        until one of them receives it; one still queued or held is left alone; one gone
        from the broker unreceived at two sweeps in a row (a message being fetched is in
        neither place for an instant) was lost that way, and is sent again with the same
        task id, at most :data:`RESEND_LIMIT` times (a worker that does not run this bootstep
        may have taken it: it then runs again).
        """
        index, sends = self.keys.unreceived(), self.keys.unreceived_sends()
        ids = [
            str(i)
            for i in self.redis.zrangebyscore(index, "-inf", repr(cutoff), start=0, num=SWEEP_LIMIT)
        ]
        if not ids:
            return 0
        from celery import signature

        raws = dict(zip(ids, self.redis.hmget(sends, ids), strict=True))
        known = {i: json.loads(raw) for i, raw in raws.items() if raw}
        engine = self.tracker.engine
        sigs = {i: signature(send["sig"], app=self.app) for i, send in known.items()}
        present = engine.in_broker(list(known), list(sigs.values())) if known else set()
        lost: list[str] = []
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            send = known.get(task_id)
            if send is None or (task_id not in present and send["n"] >= RESEND_LIMIT):
                pipe.zrem(index, task_id)
                pipe.hdel(sends, task_id)
                continue
            again_at = now
            if task_id in present:
                send.pop("missing", None)
            elif send.pop("missing", None):  # missing at the last sweep too: lost
                send["n"] += 1
                lost.append(task_id)
            else:
                # A message between the queue and a worker's unacked hash (popped, not yet
                # noted) is in neither for an instant: look again at the next sweep.
                send["missing"] = now
                again_at = 0.0
            pipe.hset(sends, task_id, json.dumps(send, default=str))
            pipe.zadd(index, {task_id: again_at})
        # Noted before it is sent: a worker may receive it at once.
        pipe.execute()
        for task_id in lost:
            send = known[task_id]
            sigs[task_id].apply_async((send["result"],), task_id=task_id, **(send["options"] or {}))
        resent = len(lost)
        if resent:
            log.warning("redrive.resent", tasks=resent)
        return resent

    def redrive(self, member: str, cutoff: float, now: float) -> int:
        """Take one overdue tracking over and publish its fresh run; 1 if it was re-driven."""
        kind, _, rest = member.partition(":")
        due = self.keys.due()
        if kind == "m":
            owner = uuid.uuid4().hex
            taken = self._take_session(
                keys=[due, self.keys.session(rest)], args=[member, repr(cutoff), owner, repr(now)]
            )
            if not isinstance(taken, list):
                return 0
            started, deadline_at = float(taken[1]), float(taken[2])
            self.app.send_task(
                TRACK_TASK,
                kwargs={
                    "message_id": rest,
                    "deadline": deadline_at - started,
                    "enqueued_at": started,
                },
                task_id=owner,
                headers={PUBLISHED_AT: time.time()},
            )
            log.warning("redrive.message", message_id=rest, task_id=owner)
            return 1
        if kind == "c":
            campaign_id, _, slot_text = rest.rpartition(":")
            slot = int(slot_text)
            run = f"{uuid.uuid4().hex[:12]}:0"
            taken = self._take_chain(
                keys=[
                    due,
                    self.keys.campaign(campaign_id),
                    self.keys.campaign_due(campaign_id),
                    self.keys.campaign_claimed(campaign_id, slot),
                ],
                args=[member, repr(cutoff), f"tick:{slot}", run, repr(now)],
            )
            if taken != 1:
                return 0
            self.app.send_task(
                TICK_TASK,
                args=(campaign_id,),
                kwargs={"slot": slot, "run": run},
                headers={PUBLISHED_AT: time.time()},
            )
            log.warning("redrive.campaign", campaign_id=campaign_id, slot=slot)
            return 1
        self.redis.zrem(due, member)  # not a member this version writes
        return 0

    def run_once(self) -> None:
        """One heartbeat: refresh what this worker holds, then sweep if it is this turn.

        Missed beats are a sign of death only when the others could have beaten: after an
        outage this worker saw, or within :data:`OUTAGE_GRACE` of a Redis restart, it waits
        until every live worker has beaten again.
        """
        now = time.time()
        due, scheduled = self.held_requests()
        try:
            self.note_held(due + scheduled, now)
            self.refresh(due)
        except redis.RedisError:
            self.beating_since = None
            raise
        if self.beating_since is None:
            # A worker starting up saw no outage; one coming back from one did.
            self.beating_since = now - (OUTAGE_GRACE if self._fresh else 0.0)
            self._fresh = False
        if now - self.beating_since >= OUTAGE_GRACE and self.redis_uptime() >= OUTAGE_GRACE:
            self.sweep()

    def redis_uptime(self) -> float:
        """Seconds since the Redis server started (a restart drops every worker's link)."""
        return float(self.redis.info("server").get("uptime_in_seconds", OUTAGE_GRACE))


class RedriveStep(bootsteps.StartStopStep):
    """Worker bootstep: runs this worker's :class:`Redriver` on a thread every second."""

    label = "smsbat re-driver"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._redriver: Redriver | None = None

    def start(self, parent: Any) -> None:
        tracker = find_tracker(parent.app)
        if tracker is None:  # not an app that runs the tracker: nothing to do
            return
        self._client = redis_client(
            tracker.settings,
            decode_responses=True,
            # Short: the receipt hook runs on the consumer's thread.
            socket_timeout=2,
            socket_connect_timeout=1,
            health_check_interval=30,
        )
        survive_broker_loss(self._client)
        redriver = self._redriver = Redriver(tracker, self._client)
        signals.task_received.connect(self._received, weak=False)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop,
            args=(redriver, self._client),
            name="smsbat-redriver",
            daemon=True,
        )
        self._thread.start()

    def _received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        redriver = self._redriver
        # A tracker run needs no note: the due index re-drives it if it is lost (and a
        # check then costs its two round trips only). Callbacks and the rest do.
        if redriver is None or request is None or getattr(request, "name", None) in DUE_INDEXED:
            return
        with contextlib.suppress(redis.RedisError):  # away: the heartbeat notes it later
            redriver.note_received(request)

    def _loop(self, redriver: Redriver, client: redis.Redis) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT):
            try:
                redriver.run_once()
                failing = False
            except Exception as exc:  # Redis away: keep beating; the next one may work
                if not failing:
                    log.warning("redrive.failed", error=type(exc).__name__, detail=str(exc)[:200])
                failing = True
        # Stopping. The steps stop before the pool has drained (a warm shutdown waits for
        # the running tasks): keep their entries alive until they are done, then retire.
        # Dying meanwhile is a dead worker's case: the others give back what it held.
        while running := redriver.running_requests():
            due, scheduled = redriver.held_requests()
            with contextlib.suppress(redis.RedisError):
                redriver.note_held(due + scheduled, time.time())
                redriver.refresh(running)
            time.sleep(HEARTBEAT / 5)
        with contextlib.suppress(redis.RedisError):
            redriver.retire(time.time())
        client.close()

    def stop(self, parent: Any) -> None:
        signals.task_received.disconnect(self._received)
        self._stop.set()
        self._thread = None  # it retires on its own once the running tasks are done
        self._redriver = None
        self._client = None

    # A cold shutdown terminates the steps instead of stopping them.
    terminate = shutdown = stop
