"""The patch of Celery's signal-handler messages (celery/compat/celery_say.py): what it
does, and what of Celery it relies on, so that an upgrade that changes it fails here."""

from __future__ import annotations

import inspect
import json
import os

from celery.apps import worker

from smsbat_tracker.celery.compat import celery_say


def test_celerys_shutdown_handler_prints_with_the_module_safe_say() -> None:
    """What the patch relies on: the shutdown handler calls the module's ``safe_say`` by
    name when it runs (so replacing the module attribute reaches it), with the stream."""
    source = inspect.getsource(worker._shutdown_handler)
    assert "safe_say(f'worker: {how} shutdown (MainProcess)', sys.__stdout__)" in source
    assert list(inspect.signature(worker.safe_say).parameters) == ["msg", "f"]


def test_a_message_off_a_terminal_is_one_json_line() -> None:
    """Installed, the module's ``safe_say`` writes one JSON line (event, level, logger,
    timestamp) to a stream that is not a terminal; uninstalled, Celery's is back."""
    original = worker.safe_say
    read, write = os.pipe()
    celery_say.install()
    try:
        with os.fdopen(write, "w") as stream:
            worker.safe_say("\nworker: Warm shutdown (MainProcess)", stream)  # type: ignore[attr-defined]
        with os.fdopen(read) as out:
            [line] = out.read().splitlines()
    finally:
        celery_say.uninstall()
    event = json.loads(line)
    assert event["event"] == "worker: Warm shutdown (MainProcess)"
    assert (event["level"], event["logger"]) == ("warning", "celery.apps.worker")
    assert event["timestamp"].endswith("Z")
    assert worker.safe_say is original  # type: ignore[attr-defined]
