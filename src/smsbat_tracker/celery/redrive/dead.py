"""Giving back at once what a dead worker held, instead of after the visibility timeout.

Celery on Redis holds a fetched task (a countdown, a callback) in the worker that fetched
it, and kombu gives it back only after the visibility timeout (an hour). The sweep gives
back the tasks a dead worker's held set names that are still unacked. A worker is dead:

- when it stopped beating for ``SMSBAT_REDRIVE_AFTER``: killed, frozen (SIGSTOP, a
  stopped container, a VM without CPU) or cut off from Redis;
- or, sooner, when it is *gone*: every re-driver connection it had (each named after it,
  ``CLIENT SETNAME``) is closed, and it has missed :data:`GONE_AFTER` of beats on the
  server's clock. A process that dies, however, has its sockets closed by its kernel: a
  SIGKILLed worker's tasks go back within about two seconds. A frozen worker keeps its
  connections open, so it is never gone: it waits ``SMSBAT_REDRIVE_AFTER``. Beats that
  stopped before the sweeping worker's own last outage do not count (everyone's
  connections closed with it, and the others are reconnecting), nor do workers whose
  connections carry no name.

A live worker found gone after all (its connection cut, and no beat for
:data:`GONE_AFTER`) finds so at its next beat, and looks up every task it holds before it
runs one (:mod:`.fence`). Tasks held by workers that do not run the re-driver are never
touched.
"""

from __future__ import annotations

from typing import Any, Final, cast

import redis

from smsbat_tracker.celery.redrive.bounds import (
    GONE_AFTER,
    HANDED_AFTER,
    HELD_CHUNK,
    SWEEP_LIMIT,
    chunked,
)
from smsbat_tracker.celery.redrive.giveback import GiveBack
from smsbat_tracker.celery.redrive.held import connection_name
from smsbat_tracker.celery.tracker import Tracker
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import Gone

__all__ = ["DeadWorkers"]

log = get_logger(__name__)

# Chunks of a dead worker's held set one sweep looks at (HELD_CHUNK tags each).
HELD_LOOKS: Final = 4
# A holder is looked for among the server's connections only once its last beat is this
# much older than a beat, by the sweeping worker's clock (the server's clock decides).
LOOK_AFTER: Final = 1.0


class DeadWorkers:
    """Restores the tasks of workers that died or stopped beating, a bounded part per sweep."""

    def __init__(self, tracker: Tracker, client: redis.Redis) -> None:
        self.settings = tracker.settings
        self.redis = client
        self.keys = Keys(tracker.settings.key_prefix)
        self.giveback = GiveBack(tracker, client)
        self._gone = Gone(client)
        self._clients_readable = True  # False once CLIENT LIST was refused

    def find_gone(self, now: float, since: float) -> list[str]:
        """Declare gone the holders whose named connections all closed, and that have not
        beaten for :data:`GONE_AFTER`, no earlier than ``since`` (server's clock); returns
        them. None when the server refuses ``CLIENT LIST`` (logged once): the bound is then
        ``SMSBAT_REDRIVE_AFTER`` alone."""
        if not self._clients_readable:
            return []
        holders = self.keys.holders()
        # Zero: declared gone already (or dead to every sweep anyway).
        quiet = [
            str(h)
            for h in self.redis.zrangebyscore(
                holders, "(0", repr(now - LOOK_AFTER), start=0, num=SWEEP_LIMIT
            )
        ]
        if not quiet:
            return []
        try:
            clients = self.redis.client_list(_type="normal")
        except redis.ResponseError as exc:  # not allowed (an ACL, a managed Redis)
            self._clients_readable = False
            log.warning("redrive.clients_unreadable", error=str(exc)[:200])
            return []
        names = {str(c.get("name") or "") for c in clients}
        closed = [h for h in quiet if connection_name(h) not in names]
        gone = self._gone(self.keys.holders(), self.keys.beats(), closed, GONE_AFTER, since)
        if gone:
            log.warning("redrive.gone", holders=gone)
        return gone

    def restore(self, now: float, since: float = 0.0) -> int:
        """Give back to the queue what dead workers held; how many tasks. ``since``: the
        server's time of the sweeping worker's first beat after its last outage (0: none).

        At most :data:`SWEEP_LIMIT` dead workers a call, and :data:`HELD_LOOKS` chunks of
        each one's held set (most of which its worker had finished and acknowledged: a
        busy worker's set names a few seconds' worth): a worker that held more is
        forgotten only once its held set is empty, so the next sweeps go on with it.
        """
        self.find_gone(now, since)
        holders = self.keys.holders()
        dead = self.redis.zrangebyscore(
            holders,
            "-inf",
            repr(now - self.settings.redrive_after),
            start=0,
            num=SWEEP_LIMIT,
            withscores=True,
        )
        restored = 0
        for member, beat in cast("list[tuple[Any, float]]", dead):
            holder = str(member)
            key = self.keys.held(holder)
            keep = self.left_to_it(holder, float(beat), now)
            # All the looks at once, so that they go back in one due order (.giveback);
            # forgotten only once given back (a sweeper dying meanwhile leaves them noted).
            looked = self.redis.srandmember(key, HELD_CHUNK * HELD_LOOKS) or []
            tags = [t for t in map(str, looked) if t not in keep]
            if tags:
                restored += self.giveback.restore(tags, "redrive.restored", holder=holder)
                for chunk in chunked(tags, HELD_CHUNK):
                    self.redis.srem(key, *chunk)
            if not self.redis.scard(key):
                self.redis.zrem(holders, holder)
                self.redis.zrem(self.keys.beats(), holder)
                self.redis.delete(self.keys.held_handed(holder))
        return restored

    def left_to_it(self, holder: str, beat: float, now: float) -> set[str]:
        """The tags a worker that stopped beating at ``beat`` had handed to its pool, which
        wait for it: a frozen worker runs them when it wakes up (Celery asks ``revoked()``
        only before the hand-off), so a copy given back would run as well. None once it is
        gone (score 0: its process died, .find_gone) or quiet for :data:`.HANDED_AFTER`."""
        if beat <= 0 or now - beat >= HANDED_AFTER:
            return set()
        return {str(t) for t in self.redis.smembers(self.keys.held_handed(holder))}
