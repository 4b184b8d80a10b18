"""Celery's worker messages from its signal handlers, as JSON lines off a terminal.

What upstream does: the worker's signal handlers (warm and cold shutdown, "Hitting Ctrl+C
again ...") print plain text with ``celery.apps.worker.safe_say``, a raw ``os.write``
(logging from a signal handler could deadlock on the logging lock). In a container every
other line is JSON, and "worker: Warm shutdown (MainProcess)" is not.

What the patch does (:func:`install`, by the package's own worker class, see
:mod:`smsbat_tracker.celery.banner`): it replaces that module's ``safe_say``, which the
handlers look up when they run, with one that writes the message as one JSON line
(``event``, ``level``, ``logger``, ``timestamp``), still with a single ``os.write``, when
the stream is not a terminal; on a terminal it is Celery's. Celery's function is kept
(:func:`uninstall` puts it back).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from smsbat_tracker.celery.compat import require

__all__ = ["BELOW", "LOWEST", "PACKAGE", "install", "say", "uninstall"]

PACKAGE: Final = "celery"
LOWEST: Final = "5.5"
BELOW: Final = "5.8"

_ORIGINAL: dict[str, Any] = {}


def say(msg: str, f: TextIO | None = None) -> None:
    """``safe_say``'s replacement: ``msg`` as one JSON line on ``f`` (default stderr) when
    it is not a terminal, else Celery's own."""
    stream = f if f is not None else sys.__stderr__
    original = _ORIGINAL.get("safe_say")
    if stream is None:
        return
    if stream.isatty() and original is not None:
        original(msg, stream)
        return
    line = {
        "event": msg.strip(),
        "level": "warning",
        "logger": "celery.apps.worker",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    os.write(stream.fileno(), (json.dumps(line) + "\n").encode())


def install() -> None:
    """Replace ``celery.apps.worker.safe_say`` (once); raises
    :class:`~smsbat_tracker.errors.UnsupportedVersion` on a Celery it was not made for."""
    require(PACKAGE, LOWEST, BELOW)
    from celery.apps import worker

    module: Any = worker  # Celery's stubs do not declare safe_say
    if "safe_say" not in _ORIGINAL:
        _ORIGINAL["safe_say"] = module.safe_say
    module.safe_say = say


def uninstall() -> None:
    """Put Celery's ``safe_say`` back."""
    from celery.apps import worker

    module: Any = worker
    original = _ORIGINAL.pop("safe_say", None)
    if original is not None:
        module.safe_say = original
