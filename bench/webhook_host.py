"""Mode c's webhook receiver, served in a child process so its CPU is measured on its own.

Run as ``python -m bench.webhook_host`` with the settings in the environment (the parent
passes ``Settings.to_env()``). It serves :func:`smsbat_tracker.webhook.create_app` with
:class:`smsbat_tracker.tools.serving.BackgroundServer` on 127.0.0.1 and a free port, prints
``{"url": ...}`` on one line, and stops when its stdin closes or on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from types import FrameType


def main() -> int:
    """Serve until stdin closes or SIGTERM."""
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Importing the Celery app reads the settings from the environment the parent set.
    from smsbat_tracker.log import configure_logging
    from smsbat_tracker.tools.serving import BackgroundServer
    from smsbat_tracker.webhook import create_app
    from smsbat_tracker.worker import app as celery_app

    # The Celery app's settings object: the receiver then shares its engine (one set of
    # connections per process), as a deployment serving both would.
    settings = celery_app.settings
    token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
    # Logs go to stderr (the parent's log file) as in a deployment, at INFO like the worker.
    configure_logging(level="INFO", secrets=[token])
    # With its lifespan, as `python -m smsbat_tracker.webhook` serves it: connected before
    # the first push arrives.
    server = BackgroundServer(create_app(settings), lifespan="on")
    with server:
        print(json.dumps({"url": server.url}), flush=True)
        # Nothing else may reach the pipe the parent stopped reading: it would fill and block.
        sys.stdout = sys.stderr

        def until_stdin_closes() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=until_stdin_closes, daemon=True).start()
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
