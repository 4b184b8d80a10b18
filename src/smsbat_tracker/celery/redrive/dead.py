"""Giving back at once what a dead worker held, instead of after the visibility timeout.

Celery on Redis holds a fetched task (a countdown, a callback) in the worker that fetched
it, and kombu gives it back only after the visibility timeout (an hour). A worker that
stopped beating for ``SMSBAT_REDRIVE_AFTER`` is dead: the sweep gives back the tasks its
held set names that are still unacked. Tasks held by workers that do not run the
re-driver are never touched.
"""

from __future__ import annotations

import redis

from smsbat_tracker.celery.redrive.bounds import SWEEP_LIMIT
from smsbat_tracker.celery.redrive.giveback import GiveBack
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.store.keys import Keys

__all__ = ["DeadWorkers"]


class DeadWorkers:
    """Restores the tasks of workers that stopped beating, a bounded part per sweep."""

    def __init__(self, tracker: Tracker, client: redis.Redis) -> None:
        self.settings = tracker.settings
        self.redis = client
        self.keys = Keys(tracker.settings.key_prefix)
        self.giveback = GiveBack(tracker, client)

    def restore(self, now: float) -> int:
        """Give back to the queue what workers that stopped beating held; how many tasks.

        At most :data:`SWEEP_LIMIT` dead workers, and as many of each one's tasks, a call:
        a worker that held more is forgotten only once its held set is empty, so the next
        sweeps go on with it.
        """
        holders = self.keys.holders()
        dead = self.redis.zrangebyscore(
            holders, "-inf", repr(now - self.settings.redrive_after), start=0, num=SWEEP_LIMIT
        )
        restored = 0
        for holder in map(str, dead):
            key = self.keys.held(holder)
            tags = [str(t) for t in self.redis.srandmember(key, SWEEP_LIMIT) or []]
            if tags:
                restored += self.giveback.restore(tags, "redrive.restored", holder=holder)
                self.redis.srem(key, *tags)
            if not self.redis.scard(key):
                self.redis.zrem(holders, holder)
        return restored
