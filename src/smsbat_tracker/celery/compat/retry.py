"""Celery's ``Retry`` shown as its reason: what Flower and the worker log show of a retry.

What upstream does: ``Task.retry`` returns (or raises) a :class:`celery.exceptions.Retry`,
whose exception arguments are ``(self, exc, when)``, so its repr (``BaseException``'s)
reads ``Retry(Retry(...), NextRun('...'), 8.0)``. A thread-pool worker reports that
``Retry`` itself as the retry's exception (the ``task-retried`` event Flower shows); a
prefork one reports its ``exc``.

What the patch does (:func:`shown_as_reason`, at each retry of a tracker task): it swaps
that one instance's class to :class:`ShownRetry`, a subclass whose repr is its reason's,
so both pools show ``NextRun('...')``. Celery's class, and every other task's retries, are
untouched; :func:`install` (by the worker's bootstep, and before the first swap) only
checks the version. It relies on ``Retry`` keeping its reason in ``exc``, pickling through
``__reduce__`` with ``self.__class__``, and taking a ``__class__`` assignment to a
subclass that adds no state (tests/test_compat_retry.py).
"""

from __future__ import annotations

import functools
from typing import Final

from celery.exceptions import Retry

from smsbat_tracker.celery.compat import require

__all__ = ["BELOW", "LOWEST", "PACKAGE", "ShownRetry", "install", "shown_as_reason"]

PACKAGE: Final = "celery"
LOWEST: Final = "5.5"
BELOW: Final = "5.8"


class ShownRetry(Retry):
    """Celery's :class:`Retry`, shown as its reason (``NextRun('...')``)."""

    def __repr__(self) -> str:
        return repr(self.exc) if self.exc is not None else super().__repr__()


@functools.cache
def install() -> str:
    """Check that the running Celery is one this patch was made for; its version.

    Raises :class:`~smsbat_tracker.errors.UnsupportedVersion` otherwise. Checked once per
    process (the worker's bootstep calls it at start); nothing is changed globally.
    """
    return require(PACKAGE, LOWEST, BELOW)


def shown_as_reason(retry: Retry) -> Retry:
    """``retry``, shown as its reason from now on (its class swapped to :class:`ShownRetry`)."""
    install()
    retry.__class__ = ShownRetry
    return retry
