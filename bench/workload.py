"""The workload every mode faces: the sandbox's message mix and how messages are created.

Each mode gets a fresh sandbox with the same seed and creates its messages the same way
(``POST /bat/messagelist``, at most 1,000 per request, all ``sms``), so the n-th message of
every mode draws the same time-to-final and the same final status.

The sandbox runs in its own process (:class:`SandboxProcess`), as the real API is remote:
in the bench process it would compete for the GIL with the application side (the enqueue
loop, the Celery producer) and skew exactly what is measured. Its ground truth is read at
the end over ``GET /sandbox/messages``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.tools.sandbox import SandboxConfig

T = TypeVar("T")

__all__ = [
    "BATCH",
    "MEDIAN_FINAL",
    "NEVER_FINAL_RATE",
    "P95_FINAL",
    "UNDELIVERABLE_RATE",
    "SandboxProcess",
    "create_messages",
    "free_port",
    "terminate",
    "workload_config",
]

MEDIAN_FINAL = 4.0
P95_FINAL = 40.0
UNDELIVERABLE_RATE = 0.05
NEVER_FINAL_RATE = 0.02
BATCH = 1_000  # the most one messagelist request carries here


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a child, then SIGKILL it if it has not exited within 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def workload_config(seed: int, *, push_url: str | None = None) -> SandboxConfig:
    """The sandbox configuration of the benchmark workload."""
    return SandboxConfig(
        median_final=MEDIAN_FINAL,
        p95_final=P95_FINAL,
        undeliverable_rate=UNDELIVERABLE_RATE,
        never_final_rate=NEVER_FINAL_RATE,
        seed=seed,
        push_url=push_url,
    )


def create_messages(base_url: str, api_key: str, count: int) -> tuple[list[str], float]:
    """Send ``count`` messages through the API; return their ids and when sending ended."""
    ids: list[str] = []
    with SmsbatClient(base_url, api_key=api_key, read_timeout=60) as client:
        for start in range(0, count, BATCH):
            batch = [
                {
                    "from": "BenchShop",
                    "to": f"+38050{n:07d}",
                    "type": "sms",
                    "text": f"Your order #{n} is confirmed",
                }
                for n in range(start, min(start + BATCH, count))
            ]
            sent = client.send_messages(batch)
            ids.extend(sent.message_ids)
    if len(ids) != count:
        raise RuntimeError(f"the sandbox accepted {len(ids)} of {count} messages")
    return ids, time.time()


def wait_until(predicate: Any, timeout: float, failure: str) -> None:
    """Poll ``predicate`` every 0.2 s; stop the bench with ``failure`` after ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise SystemExit(failure)
        time.sleep(0.2)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers bound later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SandboxProcess:
    """``python -m smsbat_tracker.tools.sandbox`` with ``config`` on 127.0.0.1, in a ``with``.

    ``.url``, ``.pid``, ``.api_key``; :meth:`truths` reads the ground truth of every message.
    """

    def __init__(self, config: SandboxConfig, log_path: Path, *, port: int | None = None) -> None:
        self.config = config
        self.api_key = config.api_key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The sandbox's process id."""
        assert self._proc is not None
        return self._proc.pid

    def _command(self) -> list[str]:
        c = self.config
        command = [
            sys.executable,
            "-m",
            "smsbat_tracker.tools.sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--api-key",
            c.api_key,
            "--processing-after",
            repr(c.processing_after),
            "--median",
            repr(c.median_final),
            "--p95",
            repr(c.p95_final),
            "--undeliverable",
            repr(c.undeliverable_rate),
            "--permanenterror",
            repr(c.permanenterror_rate),
            "--never-final",
            repr(c.never_final_rate),
            "--fallback",
            repr(c.fallback_rate),
        ]
        if c.seed is not None:
            command += ["--seed", str(c.seed)]
        if c.push_url is not None:
            command += ["--push-url", c.push_url]
        return command

    def start(self, timeout: float = 30.0) -> Self:
        """Start it and wait until it answers."""
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops it
            )
        give_up = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the sandbox exited with {self._proc.returncode}; see {self._log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/sandbox/stats", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"the sandbox did not start; see {self._log_path}")
            time.sleep(0.1)

    def truths(self) -> list[dict[str, Any]]:
        """The ground truth of every message, in creation order."""
        answer = httpx.get(f"{self.url}/sandbox/messages", timeout=120)
        answer.raise_for_status()
        messages: list[dict[str, Any]] = answer.json()["messages"]
        return messages

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
