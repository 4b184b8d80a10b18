"""Giving back to the queue, with kombu's own restore, tasks that nobody holds any more.

A broker delivery tag still in kombu's ``unacked`` hash was neither acknowledged nor given
back. When the worker that fetched it is dead, or dropped it with a lost connection, the
task is put back on its queue as kombu's ``restore_by_tag`` does (atomic under WATCH), so
a task that had been acknowledged meanwhile is never run again, but under a new delivery
tag, the old one noted as superseded (``compat.kombu_restore.restore_retagged``): a
worker that was only frozen, and wakes up holding its copy, does not run it too
(:mod:`.fence`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import redis

from smsbat_tracker import metrics
from smsbat_tracker.celery.compat.kombu_qos import make_acks
from smsbat_tracker.celery.compat.kombu_restore import require_kombu, restore_retagged
from smsbat_tracker.celery.names import DUE_AT, DUE_INDEXED
from smsbat_tracker.celery.redrive.bounds import HELD_CHUNK, chunked
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys

__all__ = ["GiveBack", "due_now", "due_time"]

log = get_logger(__name__)


def due_time(raw: str | bytes) -> float:
    """When an unacknowledged message (kombu's ``unacked`` entry) is due: its Celery ``eta``
    header as a timestamp, or the due time given back with it (:data:`DUE_AT`); ``-inf``
    when it has neither (due at once) or it cannot be read."""
    try:
        headers = json.loads(raw)[0]["headers"]
        return _due_of(headers)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return -math.inf


def _due_of(headers: dict[str, Any]) -> float:
    eta = headers.get("eta")
    if eta:
        return datetime.fromisoformat(eta).timestamp()
    due = headers.get(DUE_AT)
    return float(due) if due is not None else -math.inf


def due_now(now: float) -> Callable[[dict[str, Any]], None]:
    """An edit of a message given back at ``now`` (``restore_retagged``'s ``edit``): a
    tracker run or tick whose ETA has passed goes back without it, its due time in the
    :data:`DUE_AT` header instead.

    Celery fetches a task with an ETA past the worker's prefetch limit, to hold it until
    it is due; one already due goes to the pool at once all the same. A worker that
    restored a dead worker's tasks, or reconnected after a Redis restart, then took every
    overdue run in one go and fetched nothing else (callbacks included) until its pool had
    worked through them: in the five seconds after a Redis restart in the crash run the
    line polled 39 times a second on average over four runs, 45 over six with this. Due
    now, the runs are fetched as the prefetch limit lets them, and the run reads its place
    in the rate limit's line from the header. Other tasks keep what they were sent with:
    a user's task may read its own ETA.
    """

    def edit(payload: dict[str, Any]) -> None:
        headers = payload.get("headers")
        if not isinstance(headers, dict) or headers.get("task") not in DUE_INDEXED:
            return
        eta = headers.get("eta")
        if not eta:
            return
        with contextlib.suppress(ValueError, TypeError):
            due = datetime.fromisoformat(eta).timestamp()
            if due <= now:
                headers["eta"] = None
                headers[DUE_AT] = due

    return edit


class GiveBack:
    """Restores still-unacknowledged delivery tags to their queues."""

    def __init__(self, tracker: Tracker, client: redis.Redis) -> None:
        self.tracker = tracker
        self.redis = client
        self.superseded_key = Keys(tracker.settings.key_prefix).superseded()

    def still_unacked(self, tags: Iterable[str]) -> list[str]:
        """The ``tags`` still in kombu's ``unacked`` hash, in order."""
        unacked = self.tracker.engine.unacked_key()
        left: list[str] = []
        for chunk in chunked(tags, HELD_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for tag in chunk:
                pipe.hexists(unacked, tag)
            left += [tag for tag, there in zip(chunk, pipe.execute(), strict=True) if there]
        return left

    def in_giving_order(self, tags: Iterable[str]) -> list[str]:
        """The ``tags`` still unacked, in the order to give them back: the latest due first.

        Each goes back to the end of its queue consumed next, so the last given back is
        fetched first: the tasks due longest ago (a tracking's run keeps its place in the
        rate limit's line) and those with no due time (a callback, its outcome known)
        reach a worker's pool ahead of runs that have time. Given back in the order a
        worker's held set happened to list them, a run whose turn had come waited behind
        a hundred that were only going to be told to come back later.
        """
        unacked = self.tracker.engine.unacked_key()
        found: list[tuple[float, str]] = []
        for chunk in chunked(tags, HELD_CHUNK):
            raws = self.redis.hmget(unacked, chunk)
            found += [(due_time(raw), tag) for tag, raw in zip(chunk, raws, strict=True) if raw]
        found.sort(key=lambda pair: pair[0], reverse=True)
        return [tag for _, tag in found]

    def restore(self, tags: Iterable[str], event: str, **fields: Any) -> int:
        """Give back the ``tags`` still unacked, the latest due first (see
        :meth:`in_giving_order`); how many were (logged as ``event``, and counted in
        ``smsbat_redrives_total{kind="restored"}`` whatever the reason: a dead worker's, a
        dropped one, an orphan)."""
        left = self.in_giving_order(tags)
        if not left:
            return 0
        require_kombu()
        restored = 0
        now = time.time()
        with self.tracker.app.connection_for_write() as connection:
            channel: Any = connection.default_channel  # kombu's Redis channel
            edit = due_now(now)
            for tag in left:
                new_tag = restore_retagged(channel, tag, self.superseded_key, now, edit=edit)
                if new_tag is not None:
                    restored += 1
        if restored:
            metrics.get().redrives.labels("restored").inc(restored)
            log.warning(event, tasks=restored, **fields)
        return restored

    def ack_again(self, tasks: dict[str, tuple[str, dict[str, Any]]], event: str) -> int:
        """Acknowledge the tags of ``tasks`` (tag -> (task id, message headers)) still
        unacked: tasks this worker ran, whose acknowledgement never reached Redis (made
        on a channel a lost connection closed, or on a master that died before passing it
        on). Logged as ``event`` with the task ids; returns how many."""
        left = self.still_unacked(tasks)
        if not left:
            return 0
        engine = self.tracker.engine
        index, unacked = engine.unacked_index_key(), engine.unacked_key()
        make_acks(self.redis, [(tag, index, unacked, tasks[tag][1]) for tag in left])
        log.warning(event, tasks=len(left), task_ids=[tasks[tag][0] for tag in left][:20])
        return len(left)
