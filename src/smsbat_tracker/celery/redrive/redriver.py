"""One worker's re-driver: each heartbeat refreshes what it holds, then maybe sweeps.

:meth:`Redriver.run_once` is one heartbeat: note what this worker holds
(:mod:`.held`) and keep its trackings alive (:mod:`.alive`); then, under a Redis lock,
one worker at a time sweeps: give back what dead workers held (:mod:`.dead`), send again
the follow-ups lost on their way (:mod:`.follow_ups`), and re-drive the lost runs
(:mod:`.lost_runs`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from smsbat_tracker import metrics
from smsbat_tracker.celery.names import TRACK_TASK
from smsbat_tracker.celery.redrive.alive import Refresher
from smsbat_tracker.celery.redrive.bounds import LOCK_MS, OUTAGE_GRACE, SUPERSEDED_FOR
from smsbat_tracker.celery.redrive.dead import DeadWorkers
from smsbat_tracker.celery.redrive.fence import Fence
from smsbat_tracker.celery.redrive.follow_ups import FollowUps
from smsbat_tracker.celery.redrive.held import HeldRegistry, held_requests, request_tag
from smsbat_tracker.celery.redrive.lost_runs import LostRuns
from smsbat_tracker.celery.tracker import Tracker, tracker_of
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import Unlock

__all__ = ["Redriver"]


class Redriver:
    """One worker's refresher and sweeper; :meth:`run_once` is one heartbeat.

    Its parts, each usable on its own: :attr:`held` (the held set and heartbeat),
    :attr:`refresher`, :attr:`fence`, :attr:`dead`, :attr:`follow_ups` and
    :attr:`lost_runs`.
    """

    def __init__(
        self, tracker: Tracker | Any, client: redis.Redis, holder: str | None = None
    ) -> None:
        # The tracker, or a Celery app that carries one.
        self.tracker: Tracker = tracker if isinstance(tracker, Tracker) else tracker_of(tracker)
        self.app = self.tracker.app
        self.settings = self.tracker.settings
        self.redis = client
        self.keys = Keys(self.settings.key_prefix)
        # This worker's id; its client's connections carry its name (held.connection_name)
        # when the worker made the client for it (the bootstep does).
        self.holder = holder or uuid.uuid4().hex
        # Since when this worker has beaten without a break (None: not yet, or an outage).
        self.beating_since: float | None = None
        # The same on the server's clock, from the first beat after an outage (0: a start).
        self.since_served = 0.0
        self._fresh = True  # no beat yet: a start-up, not an outage
        self.held = HeldRegistry(self.tracker, client, self.holder)
        self.refresher = Refresher(client, self.keys)
        self.dead = DeadWorkers(self.tracker, client)
        self.follow_ups = FollowUps(self.tracker, client)
        self.lost_runs = LostRuns(self.app, client, self.keys)
        self.fence = Fence(client, self.keys, self.settings.redrive_after)
        self.fence.on_handed = self.held.note_handed
        self._unlock = Unlock(client)

    def run_once(self) -> None:
        """One heartbeat: refresh what this worker holds, then sweep if it is this turn.

        Missed beats are a sign of death only when the others could have beaten: after an
        outage this worker saw, or within :data:`OUTAGE_GRACE` of a Redis restart, it waits
        until every live worker has beaten again.
        """
        started = self.fence.beat_started()
        now = time.time()
        due, scheduled = held_requests()
        try:
            self.held.note_held(due + scheduled, now)
            beaten = self.held.beaten
            self.refresher.refresh(due)
            self.fence.beat_confirmed(
                started,
                (
                    tag
                    for r in due + scheduled
                    if getattr(r, "name", None) != TRACK_TASK and (tag := request_tag(r))
                ),
                # Found dead, or gone, meanwhile (score 0, or its entry swept away): what
                # it holds may have been given back.
                found_dead=not self._fresh and (beaten is None or not beaten.previous),
            )
        except redis.RedisError:
            self.beating_since = None
            raise
        if self.beating_since is None:
            # A worker starting up saw no outage; one coming back from one did.
            self.beating_since = now - (OUTAGE_GRACE if self._fresh else 0.0)
            if not self._fresh and beaten is not None:
                self.since_served = beaten.served
            self._fresh = False
        if now - self.beating_since >= OUTAGE_GRACE:
            uptime = self.redis_uptime()
            if uptime >= OUTAGE_GRACE:
                self.sweep(uptime=uptime)

    def redis_uptime(self) -> float:
        """Seconds since the Redis server started (a restart drops every worker's link)."""
        return float(self.redis.info("server").get("uptime_in_seconds", OUTAGE_GRACE))

    def sweep(self, now: float | None = None, uptime: float | None = None) -> int:
        """Re-drive lost trackings if this worker gets the lock; returns how many.

        ``uptime``: the Redis server's, as the beat read it (beats from before its start
        say nothing of connections open now); None when not read.
        """
        lock = self.keys.redrive_lock()
        if not self.redis.set(lock, self.holder, nx=True, px=LOCK_MS):
            return 0
        try:
            now = time.time() if now is None else now
            counts = metrics.get().redrives
            # Beats from before this worker's last outage, or before Redis started, say
            # nothing of connections open now (the server's clock: see .dead).
            beaten = self.held.beaten
            since = self.since_served
            if beaten is not None and uptime:
                since = max(since, beaten.served - uptime)
            self.dead.restore(now, since)  # counted as restored by the give-back itself
            self.redis.zremrangebyscore(self.keys.superseded(), "-inf", repr(now - SUPERSEDED_FOR))
            cutoff = now - self.settings.redrive_after - self.lost_runs.queue_age(now)
            counts.labels("follow_up").inc(self.follow_ups.resend_lost(cutoff, now))
            count = self.lost_runs.sweep(cutoff, now)
            counts.labels("run").inc(count)
            return count
        finally:
            self._unlock(lock, self.holder)
