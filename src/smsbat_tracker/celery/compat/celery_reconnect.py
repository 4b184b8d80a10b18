"""A worker fetches again within about a second of the broker coming back, not after
Celery's growing backoff.

What upstream does: when the consumer loses its broker connection it reconnects with
``conn.ensure_connection(errback, max_retries, callback=...)``, kombu's defaults: a try at
once, then sleeps of 2, 4, 6 ... up to 30 s. A Redis restart of 3 s is over before the
third try, at 6 s: three seconds with no task fetched, while every check due meanwhile
waits (twice a crash run: bench/RESULTS.md). No setting reaches these intervals
(``broker_transport_options``' ``interval_*`` apply to publishing).

What the patch does (:func:`install`, by the re-driver's bootstep): the consumer's
``ensure_connected`` reconnects with sleeps of :data:`INTERVALS` (0.25, 0.5, 0.75 then
1 s): back within a second of the broker, at the cost of one connection try (and Celery's
one log line) a second per worker during a long outage.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, Final

from smsbat_tracker.celery.compat import patch_once, patched, require

__all__ = ["BELOW", "INTERVALS", "LOWEST", "PACKAGE", "install", "installed", "quick_retries"]

# The Celery versions whose Consumer.ensure_connected this patch was made for.
PACKAGE: Final = "celery"
LOWEST: Final = "5.5"
BELOW: Final = "5.8"

# kombu's retry intervals (start, step, most), in seconds.
INTERVALS: Final = {"interval_start": 0.25, "interval_step": 0.25, "interval_max": 1.0}

_MARK: Final = "_smsbat_quick_retries"


def quick_retries(
    ensure_connected: Callable[[Any, Any], Any],
) -> Callable[[Any, Any], Any]:
    """``ensure_connected``, its connection's ``ensure_connection`` given :data:`INTERVALS`."""

    @functools.wraps(ensure_connected)
    def quick(self: Any, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(type(conn).ensure_connection, conn, **INTERVALS)
        try:
            return ensure_connected(self, conn)
        finally:
            with contextlib.suppress(AttributeError):
                del conn.ensure_connection

    return quick


def install() -> None:
    """Patch ``Consumer.ensure_connected`` (once). Raises
    :class:`~smsbat_tracker.errors.UnsupportedVersion` (patching nothing) on a Celery
    outside ``LOWEST``..``BELOW``."""
    require(PACKAGE, LOWEST, BELOW)
    from celery.worker.consumer.consumer import Consumer

    patch_once(Consumer, "ensure_connected", quick_retries, _MARK)


def installed() -> bool:
    """Whether ``Consumer.ensure_connected`` carries this patch."""
    from celery.worker.consumer.consumer import Consumer

    return patched(Consumer, "ensure_connected", _MARK)
