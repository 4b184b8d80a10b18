"""A real ``celery worker`` subprocess, for the demo, the tests and the benchmarks.

It runs the package's own app (``-A smsbat_tracker.worker``), or another that calls
``init_app``, with the given settings in its environment, in a process group of its own
so that stopping it takes its pool children too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Final

from smsbat_tracker.config import Settings

__all__ = ["PACKAGE_APP", "stop_process_group", "worker_process"]

# What `celery -A` loads by default: the package's own app.
PACKAGE_APP: Final = "smsbat_tracker.worker"


@contextlib.contextmanager
def worker_process(
    settings: Settings,
    *,
    concurrency: int = 8,
    pool: str = "threads",
    queues: Sequence[str] = (),
    log_path: str = os.devnull,
    imports: Sequence[str] = (),
    app: str = PACKAGE_APP,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` subprocess using ``settings``; stopped on exit.

    ``queues``: the ``-Q`` list; empty, every queue the settings name. ``imports``: more
    task modules for the worker to load (``--include``), beside the demo's recipes.
    ``app``: what ``celery -A`` loads, the package's own app by default (a user's app
    module that calls ``init_app`` reads the same settings from the environment).
    """
    env = {**os.environ, **settings.to_env()}
    only = ["--queues", ",".join(queues)] if queues else []
    # It runs the recipe tasks too, which record outcomes for the demo, the tests and the
    # benchmarks (a production worker does not).
    only += ["--include", ",".join(("smsbat_tracker.tools.recipes", *imports))]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "INFO",
                "--hostname",
                f"demo-{uuid.uuid4().hex[:6]}@%h",
                "--without-gossip",
                "--without-mingle",
                *only,
            ],
            env=env,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM a process started in a session of its own, with its children; SIGKILL them
    if it has not exited within ``timeout`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
