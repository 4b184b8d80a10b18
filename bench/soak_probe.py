"""Loaded into the soak's workers (``--include bench.soak_probe``).

- ``noop_tracking``: Celery's own floor for the soak: a no-op task that retries itself on
  a tracking's schedule, then counts itself done.
- With ``SMSBAT_SOAK_TRACEMALLOC=DIR``: each prefork child starts tracemalloc and dumps a
  snapshot to ``DIR/child-<pid>-<n>.snap`` after its ``n``-th finished tracking, for n in
  :data:`SNAPSHOTS`.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any, Final

from celery import Task, signals

from smsbat_tracker.worker import app

# After how many finished trackings a child dumps a snapshot (SMSBAT_SOAK_SNAPSHOTS="a,b").
SNAPSHOTS: Final = tuple(
    int(n) for n in os.environ.get("SMSBAT_SOAK_SNAPSHOTS", "1000,5000").split(",")
)
COUNTDOWNS: Final = (5.0, 7.5, 10.0)


@app.task(bind=True, name="bench.noop_tracking", max_retries=None, ignore_result=True)
def noop_tracking(self: Task[Any, Any], left: int) -> None:
    """Retry ``left`` more times on a tracking's countdowns, then count itself done."""
    if left > 0:
        step = COUNTDOWNS[min(len(COUNTDOWNS) - left, len(COUNTDOWNS) - 1)]
        raise self.retry(kwargs={"left": left - 1}, countdown=step)
    app.engine.redis.incr("bench:soak:floor:done")


_DIRECTORY = os.environ.get("SMSBAT_SOAK_TRACEMALLOC")
_finished = [0]  # trackings finished in this child


@signals.worker_process_init.connect
def _start_tracing(**_: Any) -> None:
    if _DIRECTORY:
        tracemalloc.start(10)


@signals.task_postrun.connect
def _count(sender: Any = None, state: str | None = None, **_: Any) -> None:
    if not _DIRECTORY or getattr(sender, "name", None) != "smsbat_tracker.track_message":
        return
    if state != "SUCCESS" or not tracemalloc.is_tracing():
        return
    _finished[0] += 1
    if _finished[0] in SNAPSHOTS:
        path = Path(_DIRECTORY) / f"child-{os.getpid()}-{_finished[0]}.snap"
        tracemalloc.take_snapshot().dump(str(path))
