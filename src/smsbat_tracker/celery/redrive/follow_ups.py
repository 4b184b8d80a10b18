"""Sending again the follow-up tasks lost between the broker queue and a worker.

Kombu's Redis transport pops a message (``BRPOP``) before the worker records it as
unacknowledged, so a worker killed with the reply unread loses it. A follow-up (a
callback, a report) the tracker sent to a queue tracker workers consume stays in the
``unreceived`` index until one of them receives it (:meth:`.held.HeldRegistry.note_received`);
one gone from the broker unreceived is sent again with the same task id.

A worker killed after kombu moved the message to its ``unacked`` hash, but before the
worker noted it, leaves it there, in no worker's held set: nobody would give it back
before kombu's visibility timeout (an hour by default), and the callback would be late by
that much. One fetched more than :data:`.bounds.ORPHAN_AFTER` ago that no live worker
holds is given back to its queue (:class:`.giveback.GiveBack`). A tracker worker notes
what it fetches at once, and names it again at every beat, also at its first one after a
failover that lost the note: only a fetcher that died (or a foreign worker on the same
queue, which the README advises against) leaves one unnamed that long.

The receipt is noted once more when the follow-up is acknowledged, on the broker's own
connection, just before the acknowledgement (:func:`note_receipt_on_ack`, a hook of
:mod:`smsbat_tracker.celery.compat.kombu_qos`), with a mark that it ran: after a Sentinel
failover, a new master that has the acknowledgement has that note too, so a follow-up
that ran is never sent again because the note made at receipt was lost with the old
master; and a copy the new master still has queued (its pop was not replicated) is
skipped by the worker that fetches it.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from smsbat_tracker.celery.compat.kombu_qos import BeforeAck
from smsbat_tracker.celery.redrive.bounds import (
    ORPHAN_AFTER,
    RAN_FOR,
    RESEND_LIMIT,
    SWEEP_LIMIT,
)
from smsbat_tracker.celery.redrive.giveback import GiveBack
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.engine.dispatch import FOLLOW_UP_HEADER
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import ClaimResend, Resend

__all__ = ["FollowUps", "note_receipt_on_ack"]

log = get_logger(__name__)


def note_receipt_on_ack(keys: Keys) -> BeforeAck:
    """The hook that notes a follow-up received, and ran, as it is acknowledged (see
    above): a copy that comes back (a failover that lost the pop from the queue, a
    give-back) is skipped by the fence (:mod:`.fence`) for :data:`.bounds.RAN_FOR`."""
    index, sends = keys.unreceived(), keys.unreceived_sends()

    def before_ack(pipe: Any, headers: dict[str, Any]) -> None:
        task_id = headers.get("id")
        if not headers.get(FOLLOW_UP_HEADER) or not task_id:
            return
        pipe.zrem(index, str(task_id))
        pipe.hdel(sends, str(task_id))
        pipe.set(keys.ran(str(task_id)), "1", ex=int(RAN_FOR))

    return before_ack


class FollowUps:
    """Resends the follow-ups no tracker worker received, :data:`SWEEP_LIMIT` a sweep."""

    def __init__(self, tracker: Tracker, client: redis.Redis) -> None:
        self.tracker = tracker
        self.redis = client
        self.keys = Keys(tracker.settings.key_prefix)
        self.giveback = GiveBack(tracker, client)
        self._claim = ClaimResend(client)

    def resend_lost(self, cutoff: float, now: float) -> int:
        """Send again the follow-up tasks sent before ``cutoff`` that no tracker worker has
        received and the broker no longer holds; returns how many.

        One still queued or held is left alone; one gone from the broker unreceived at two
        sweeps in a row (a message being fetched is in neither place for an instant) was
        lost, and is sent again with the same task id, at most :data:`RESEND_LIMIT` times
        (a worker that does not run the re-driver may have taken it: it then runs again).
        """
        index, sends = self.keys.unreceived(), self.keys.unreceived_sends()
        ids = [
            str(i)
            for i in self.redis.zrangebyscore(index, "-inf", repr(cutoff), start=0, num=SWEEP_LIMIT)
        ]
        if not ids:
            return 0
        from celery import signature

        app = self.tracker.app
        raws = dict(zip(ids, self.redis.hmget(sends, ids), strict=True))
        known: dict[str, dict[str, Any]] = {i: json.loads(raw) for i, raw in raws.items() if raw}
        engine = self.tracker.engine
        sigs = {i: signature(send["sig"], app=app) for i, send in known.items()}
        present = engine.broker.locate(list(known), list(sigs.values())) if known else {}
        fetched = {i: tag for i, tag in present.items() if tag is not None}
        if fetched:
            self.give_back_orphans(fetched, now)
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
                continue  # claimed below, unless it was sent meanwhile
            else:
                # A message between the queue and a worker's unacked hash (popped, not yet
                # noted) is in neither for an instant: look again at the next sweep.
                send["missing"] = now
                again_at = 0.0
            pipe.hset(sends, task_id, json.dumps(send, default=str))
            pipe.zadd(index, {task_id: again_at})
        pipe.execute()
        resent = 0
        for task_id in lost:
            send = known[task_id]
            # Noted before it is sent (a worker may receive it at once), and only if no
            # tracking run sent it since this sweep read it: two senders that each found it
            # gone would send it twice, under one task id.
            claimed = self._claim(
                sends,
                index,
                task_id,
                read=str(raws[task_id]),
                entry=json.dumps(send, default=str),
                now=now,
            )
            if claimed is not Resend.CLAIMED:
                log.info("redrive.resend_skipped", task_id=task_id)
                continue
            sigs[task_id].apply_async((send["result"],), task_id=task_id, **(send["options"] or {}))
            resent += 1
        if resent:
            log.warning("redrive.resent", tasks=resent)
        return resent

    def give_back_orphans(self, fetched: dict[str, str], now: float) -> int:
        """Give back the follow-ups (task id -> delivery tag) a worker fetched more than
        :data:`.bounds.ORPHAN_AFTER` ago and no live worker holds; how many were."""
        settings = self.tracker.settings
        index = self.tracker.engine.unacked_index_key()
        tags = list(fetched.values())
        pipe = self.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.zscore(index, tag)
        since = dict(zip(tags, pipe.execute(), strict=True))
        bound = now - max(ORPHAN_AFTER, settings.redrive_after)
        old = [t for t in tags if since[t] is not None and since[t] < bound]
        if not old:
            return 0
        alive = self.redis.zrangebyscore(
            self.keys.holders(), repr(now - settings.redrive_after), "+inf"
        )
        pipe = self.redis.pipeline(transaction=False)
        pairs = [(holder, tag) for holder in map(str, alive) for tag in old]
        for holder, tag in pairs:
            pipe.sismember(self.keys.held(holder), tag)  # SMISMEMBER needs Redis 6.2
        held = {tag for (_, tag), mark in zip(pairs, pipe.execute(), strict=True) if mark}
        orphans = [t for t in old if t not in held]
        if not orphans:
            return 0
        return self.giveback.restore(orphans, "redrive.orphans_restored")
