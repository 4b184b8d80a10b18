"""A worker that wakes up from a freeze does not run what was handed to another.

A frozen worker (SIGSTOP, a stopped container, a VM without CPU, a long pause) stops
beating; after ``SMSBAT_REDRIVE_AFTER`` the others give back what it held, each task under
a new delivery tag, the old tag noted in ``Keys.superseded()``
(:mod:`.giveback`). When the frozen worker wakes up it still holds its copies under the
old tags. Celery asks ``Request.revoked()`` before it runs a task, and the patch in
:mod:`smsbat_tracker.celery.compat.celery_request` asks :meth:`Fence.superseded`:

- while this worker's beats are recent (the last one confirmed began less than
  ``SMSBAT_REDRIVE_AFTER`` minus :data:`MARGIN` ago, and less than :data:`.GONE_AFTER`
  ago: the others find a worker gone by the server's clock, which a beat's start
  precedes), nothing can have been given back from under it: no Redis call;
- after a gap, or when the others found it dead or gone meanwhile (:mod:`.dead`), the
  first beat that reaches Redis looks up every tag the worker holds, and keeps those
  superseded in memory before it counts as recent;
- until then, a task about to run is looked up on its own (one ``ZSCORE``).

A follow-up the tracker sent (a callback, a report) is also skipped when it already ran:
its acknowledgement marked it (``Keys.ran``, see :mod:`.follow_ups`), and a copy that a
failover brought back (the new master never saw it popped) or a give-back returned finds
the mark. That costs one ``EXISTS`` per follow-up. A tracking's own runs are fenced by
its session (a superseded run stops at its first Redis call), and cost nothing here.

Celery asks ``revoked()`` only before it hands a task to the pool: a task handed over
(running, or waiting for a pool process) when the worker froze runs when it wakes up,
whatever the fence would say. So the fence tells :attr:`Fence.on_handed` of each copy it
lets through; the held registry notes it apart, and the others leave it to the frozen
worker instead of giving it back (:mod:`.dead`), until the worker is found gone or has
been quiet for :data:`.bounds.HANDED_AFTER`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import redis

from smsbat_tracker.celery.names import TRACK_TASK
from smsbat_tracker.celery.redrive.bounds import GONE_AFTER, HELD_CHUNK, chunked
from smsbat_tracker.engine.dispatch import FOLLOW_UP_HEADER
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys

__all__ = ["MARGIN", "Fence"]

log = get_logger(__name__)

# Below SMSBAT_REDRIVE_AFTER by this much a beat still counts as recent: room for the
# other workers' clocks and for the beat's own round trip.
MARGIN: Final = 1.0
# After a lookup failed (Redis away), tasks run without one for this long: the others
# cannot give anything back without Redis either, and a lookup must not hold up the
# consumer each time.
LOOKUP_PAUSE: Final = 5.0


class Fence:
    """This worker's record of which of its copies were superseded."""

    def __init__(self, client: redis.Redis, keys: Keys, redrive_after: float) -> None:
        self.redis = client
        self.keys = keys
        self.key = keys.superseded()
        self.recent = max(0.5, min(redrive_after - MARGIN, GONE_AFTER))
        self._lock = threading.Lock()
        self._superseded: set[str] = set()
        # The start of the last beat that counts (both clocks): a fresh worker holds
        # nothing anyone could have given back.
        self._beat = (time.monotonic(), time.time())
        self._paused_until = 0.0
        # Told of each copy the fence lets through (it goes to the pool now): the held
        # registry notes it apart (HeldRegistry.note_handed).
        self.on_handed: Callable[[Any], None] | None = None

    def _since(self, mark: tuple[float, float], until: tuple[float, float] | None = None) -> float:
        """Seconds from ``mark`` to ``until`` (default now): the monotonic clock stops in a
        suspend, the wall clock may be set back; the larger of the two."""
        end = until or (time.monotonic(), time.time())
        return max(end[0] - mark[0], end[1] - mark[1])

    def is_recent(self) -> bool:
        """Whether nothing this worker holds can have been given back by now."""
        return self._since(self._beat) < self.recent

    def beat_started(self) -> tuple[float, float]:
        """The mark of a beat starting now (before it reads what the worker holds)."""
        return (time.monotonic(), time.time())

    def beat_confirmed(
        self, started: tuple[float, float], tags: Iterable[str], *, found_dead: bool = False
    ) -> int:
        """A beat that began at ``started`` reached Redis, holding ``tags`` (tracker runs
        aside). After a gap, or when the others had ``found_dead`` this worker, looks them
        all up first. Returns how many are superseded.

        Raises :class:`redis.RedisError` (the beat then does not count).
        """
        held = set(tags)
        gap = found_dead or self._since(self._beat, started) >= self.recent
        found: set[str] = set()
        if gap and held:
            for chunk in chunked(sorted(held), HELD_CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for tag in chunk:
                    pipe.zscore(self.key, tag)
                found |= {t for t, s in zip(chunk, pipe.execute(), strict=True) if s is not None}
        with self._lock:
            self._superseded = (self._superseded & held) | found
            self._beat = started
        if found:
            log.warning("redrive.superseded_held", tasks=len(found))
        return len(found)

    def superseded(self, request: Any) -> bool:
        """Whether ``request``'s copy was given back from under this worker, or is a
        follow-up that already ran (Celery asks before it runs the task; see the module's
        docstring). A copy let through is handed to the pool: :attr:`on_handed` is told."""
        if self._superseded_copy(request):
            return True
        if self.on_handed is not None:
            self.on_handed(request)
        return False

    def _superseded_copy(self, request: Any) -> bool:
        if getattr(request, "name", None) == TRACK_TASK:
            return False
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is None:
            return False
        headers = getattr(message, "headers", None) or {}
        if headers.get(FOLLOW_UP_HEADER) and self._ran(str(getattr(request, "id", ""))):
            return True
        tag = str(tag)
        with self._lock:
            if tag in self._superseded:
                return True
        if self.is_recent():
            return False
        return self._ask(lambda: self.redis.zscore(self.key, tag) is not None)

    def _ran(self, task_id: str) -> bool:
        """Whether the follow-up ``task_id`` ran and was acknowledged (a copy a failover
        or a give-back brought back; see :mod:`.follow_ups`)."""
        return bool(task_id) and self._ask(lambda: bool(self.redis.exists(self.keys.ran(task_id))))

    def _ask(self, lookup: Callable[[], bool]) -> bool:
        """``lookup()``, or False while Redis is away (see :data:`LOOKUP_PAUSE`)."""
        if time.monotonic() < self._paused_until:
            return False
        try:
            return lookup()
        except redis.RedisError as exc:
            self._paused_until = time.monotonic() + LOOKUP_PAUSE
            log.warning(
                "redrive.fence_unreachable", error=type(exc).__name__, detail=str(exc)[:200]
            )
            return False
