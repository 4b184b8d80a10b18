"""A worker skips a task it holds when the copy was superseded while it was frozen.

What upstream does: a worker's ``Request.revoked()`` is asked right before the task goes
to the pool (``execute_using_pool``, also in the per-task request classes Celery builds,
and ``execute``); when it answers True the task is not run and the worker goes on. A
worker frozen (SIGSTOP, a VM without CPU, a long pause) keeps every task it held, and
runs them when it wakes up, even those the other workers gave back and ran meanwhile.

What the patch does (:func:`install`, by the re-driver's bootstep): ``revoked()`` also
asks a *fence* (:mod:`smsbat_tracker.celery.redrive.fence`) whether this copy was
superseded. A superseded copy is skipped the way Celery skips a revoked one, except that
nothing is stored in the result backend and no ``task-revoked`` event is sent: the task
id is the other copy's, which runs (or ran) under it. It is acknowledged (its old tag no
longer exists in Redis: the acknowledgement deletes nothing) and forgotten by the worker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from smsbat_tracker.celery.compat import patch_once, patched, require
from smsbat_tracker.log import get_logger

__all__ = ["BELOW", "LOWEST", "PACKAGE", "fenced", "install", "installed"]

log = get_logger(__name__)

# The Celery versions whose worker Request this patch was made for (and tested against).
PACKAGE: Final = "celery"
LOWEST: Final = "5.5"
BELOW: Final = "5.8"

_MARK: Final = "_smsbat_fenced"

# The fence the patched revoked() asks (set by install; None: ask nothing).
_FENCE: dict[str, Callable[[Any], bool]] = {}


def install(superseded: Callable[[Any], bool]) -> None:
    """Make ``Request.revoked()`` also skip a request ``superseded(request)`` names.

    Once per process; a later call only replaces the fence. Raises
    :class:`~smsbat_tracker.errors.UnsupportedVersion` (patching nothing) on a Celery
    outside ``LOWEST``..``BELOW``.
    """
    require(PACKAGE, LOWEST, BELOW)
    from celery.worker.request import Request

    _FENCE["fence"] = superseded
    patch_once(Request, "revoked", fenced, _MARK)


def fenced(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``Request.revoked``, also true (the request skipped) for one the fence names."""

    @functools.wraps(original)
    def revoked(self: Any) -> bool:
        if original(self):
            return True
        fence = _FENCE.get("fence")
        if fence is None or not fence(self):
            return False
        _skip(self)
        return True

    return revoked


def uninstall() -> None:
    """Forget the fence (the patch stays, asking nothing): a worker that stops."""
    _FENCE.pop("fence", None)


def installed() -> bool:
    """Whether Celery's worker Request carries this patch."""
    from celery.worker.request import Request

    return patched(Request, "revoked", _MARK)


def _skip(request: Any) -> None:
    """What ``_announce_revoked`` does, less the backend's REVOKED and the event."""
    from celery.worker.state import task_ready

    log.warning("redrive.superseded_skipped", task=request.name, task_id=request.id)
    task_ready(request)
    request.acknowledge()
    request._already_revoked = True
