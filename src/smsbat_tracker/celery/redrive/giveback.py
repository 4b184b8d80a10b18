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

import json
import math
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import redis

from smsbat_tracker import metrics
from smsbat_tracker.celery.compat.kombu_qos import make_acks
from smsbat_tracker.celery.compat.kombu_restore import require_kombu, restore_retagged
from smsbat_tracker.celery.redrive.bounds import HELD_CHUNK, chunked
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys

__all__ = ["GiveBack", "due_time"]

log = get_logger(__name__)


def due_time(raw: str | bytes) -> float:
    """When an unacknowledged message (kombu's ``unacked`` entry) is due: its Celery ``eta``
    header as a timestamp; ``-inf`` when it has none (due at once) or it cannot be read."""
    try:
        payload = json.loads(raw)[0]
        eta = payload["headers"].get("eta")
        return datetime.fromisoformat(eta).timestamp() if eta else -math.inf
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return -math.inf


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
            for tag in left:
                if restore_retagged(channel, tag, self.superseded_key, now) is not None:
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
