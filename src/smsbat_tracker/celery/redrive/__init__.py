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
each worker runs a :class:`Redriver` on a thread (started by the :class:`RedriveStep`
bootstep, so there is nothing more to run). Its parts, one module each:

- :mod:`.held`: every second the worker notes the broker delivery tags of every task it
  holds, and beats; a task it dropped (a lost connection) is given back (:mod:`.giveback`);
- :mod:`.alive`: it refreshes the due entries of the tracker tasks it holds that are due
  or running: a tracking waiting for a busy pool, or a long check, never looks overdue;
- under a Redis lock, one worker at a time *sweeps* (:mod:`.redriver`): :mod:`.dead` gives
  back what workers that stopped beating held, :mod:`.follow_ups` sends again the
  follow-ups lost between the queue and a worker, and :mod:`.lost_runs` takes the lost
  trackings over and publishes their fresh runs;
- :mod:`.bounds`: the pace, and the most work one Redis call may do.
"""

from __future__ import annotations

from smsbat_tracker.celery.redrive.bounds import (
    HEARTBEAT,
    LOCK_MS,
    OUTAGE_GRACE,
    RESEND_LIMIT,
    SWEEP_LIMIT,
)
from smsbat_tracker.celery.redrive.redriver import Redriver
from smsbat_tracker.celery.redrive.step import RedriveStep

__all__ = [
    "HEARTBEAT",
    "LOCK_MS",
    "OUTAGE_GRACE",
    "RESEND_LIMIT",
    "SWEEP_LIMIT",
    "RedriveStep",
    "Redriver",
]
