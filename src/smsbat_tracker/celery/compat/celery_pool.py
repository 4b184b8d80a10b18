"""A prefork pool keeps the jobs it already handed to a child when the broker connection is
lost: a task a child runs is acknowledged, not run twice.

What upstream does: on a lost connection the consumer flushes the pool
(``AsynPool.flush``), which drops from the pool's cache every job no child has accepted yet
("they will be redelivered by the broker anyway"). A job already written into a child's
pipe is run by that child all the same; its acceptance and its result then find no job,
so the task is never acknowledged, and runs a second time once it is given back (seen: a
callback run twice after a Sentinel failover, 1 run in 5).

What the patch does (:func:`install`, by the re-driver's bootstep): the jobs written, or
being written, to a child that is alive are put back into the cache after the flush.
Their acceptance acknowledges them (on a torn-down channel: on the live client,
:mod:`.kombu_qos`) and their results are handled as usual. Jobs still waiting in the
pool's outbound buffer, or written to a child that died, stay dropped: the re-driver
gives them back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from smsbat_tracker.celery.compat import patch_once, patched, require
from smsbat_tracker.log import get_logger

__all__ = ["BELOW", "LOWEST", "PACKAGE", "install", "installed", "keep_handed_jobs"]

log = get_logger(__name__)

# The Celery versions whose AsynPool.flush this patch was made for (and tested against).
PACKAGE: Final = "celery"
LOWEST: Final = "5.5"
BELOW: Final = "5.8"

_MARK: Final = "_smsbat_keeps_handed_jobs"


def handed_to_children(pool: Any) -> list[Any]:
    """The jobs in ``pool``'s cache that no child accepted yet but one was written to."""
    return [
        job
        for job in list(pool._cache.values())
        if not job._accepted and getattr(job, "_write_to", None) is not None
    ]


def keep_handed_jobs(flush: Callable[[Any], None]) -> Callable[[Any], None]:
    """``flush``, then the jobs it dropped that a live child holds put back in the cache."""

    @functools.wraps(flush)
    def keeping(self: Any) -> None:
        handed = handed_to_children(self)
        flush(self)
        kept = 0
        for job in handed:
            if job._job not in self._cache and job._write_to._is_alive():
                self._cache[job._job] = job
                kept += 1
        if kept:
            log.info("pool.kept_handed_jobs", jobs=kept)

    return keeping


def install() -> None:
    """Patch ``AsynPool.flush`` (once). Raises
    :class:`~smsbat_tracker.errors.UnsupportedVersion` (patching nothing) on a Celery
    outside ``LOWEST``..``BELOW``."""
    require(PACKAGE, LOWEST, BELOW)
    from celery.concurrency.asynpool import AsynPool

    patch_once(AsynPool, "flush", keep_handed_jobs, _MARK)


def installed() -> bool:
    """Whether ``AsynPool.flush`` carries this patch."""
    from celery.concurrency.asynpool import AsynPool

    return patched(AsynPool, "flush", _MARK)
