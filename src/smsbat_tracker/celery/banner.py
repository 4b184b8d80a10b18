"""The package's worker: Celery's start-up banner as one log line off a terminal.

Celery prints a banner of some twenty lines to stdout when a worker starts. On a terminal
that is what a person reads; in a container or under a supervisor every other line is
JSON, and a log pipeline would take each banner line as an event. There the banner is one
``worker.started`` line with the same facts instead. Only the package's own app
(``celery -A smsbat_tracker.worker``) uses this worker class; a user's app keeps Celery's.
"""

from __future__ import annotations

import sys
from typing import Any

import celery
from celery.apps.worker import Worker as CeleryWorker

from smsbat_tracker.celery.compat import celery_say
from smsbat_tracker.celery.redrive.held import consumed_queues
from smsbat_tracker.log import get_logger

__all__ = ["Worker", "banner_fields"]

log = get_logger(__name__)


def banner_fields(worker: Any) -> dict[str, Any]:
    """What Celery's banner says, as fields: node, versions, broker (no password), pool,
    queues and tasks."""
    app = worker.app
    pool = getattr(worker, "pool_cls", None)
    return {
        "hostname": worker.hostname,
        "celery": celery.__version__,
        "app": app.main or "__main__",
        "broker": app.connection().as_uri(),  # kombu masks the password
        "concurrency": worker.concurrency,
        "pool": getattr(pool, "__module__", str(pool)).rsplit(".", 1)[-1],
        "task_events": bool(worker.task_events),
        "queues": consumed_queues(app),
        "tasks": sorted(t for t in app.tasks if not t.startswith("celery.")),
    }


class Worker(CeleryWorker):
    """Celery's worker, with its banner, and the messages of its signal handlers
    (:mod:`smsbat_tracker.celery.compat.celery_say`), as JSON lines off a terminal."""

    def install_platform_tweaks(self, worker: Any) -> None:
        celery_say.install()  # before the handlers that print with it are installed
        super().install_platform_tweaks(worker)

    def emit_banner(self) -> None:
        if sys.stderr.isatty():
            super().emit_banner()
            return
        log.info("worker.started", **banner_fields(self))
