"""Mode a: the provider documentation's own approach, run in a child process.

What the documentation tells people to write: a blocking ``wait_for_delivery(message_id)``
per message, in its own thread, that checks at once and then every 5 s (fixed), retries an
HTTP error 3 times (waiting 1 s, then 2 s), and gives up after 60 s. It uses one plain
synchronous ``httpx.Client`` shared by all threads, with the same timeouts as the project's
client (connect 5 s, read 3 s) so neither side wins on timeouts.

It runs in its own process so that the bench can measure its CPU and memory apart from the
sandbox (which lives in the bench process). Protocol, one JSON document per line:

1. the child prints ``{"ready": true}`` once imported and set up;
2. the parent writes ``{"base_url", "api_key", "ids", "interval", "give_up"}`` (and
   optionally ``"read_timeout"``, default 3 s) to stdin;
3. the child starts one thread per id at once, and when all have returned prints
   ``{"results": {id: {"outcome", "started_at", "known_at", "checks", "errors"}},
   "cpu": {"ready", "end"}}`` (its own CPU seconds at step 1 and now).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import httpx

__all__ = ["FINAL", "check_status", "main", "wait_for_delivery"]

FINAL = frozenset({"delivered", "undeliverable", "permanenterror"})
_TRIES = 3  # the documentation's retry example: 3 tries, backing off 1 s, 2 s


class _Counter:
    """Checks and errors of one message (a thread owns it alone)."""

    def __init__(self) -> None:
        self.checks = 0
        self.errors = 0


def check_status(client: httpx.Client, message_id: str, counter: _Counter) -> dict[str, Any]:
    """``GET /bat/message/{id}`` with the documentation's retry on errors."""
    for attempt in range(_TRIES):
        counter.checks += 1
        try:
            response = client.get(f"/bat/message/{message_id}")
            response.raise_for_status()
            body: dict[str, Any] = response.json()
            return body
        except (httpx.HTTPError, ValueError):
            counter.errors += 1
            if attempt == _TRIES - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def wait_for_delivery(
    client: httpx.Client,
    message_id: str,
    counter: _Counter,
    *,
    interval: float = 5.0,
    give_up: float = 60.0,
) -> str:
    """Block until the message is final; return its status, or ``"timeout"``.

    Exactly the documented shape: check, return if final, sleep ``interval``, repeat while
    less than ``give_up`` seconds have passed.
    """
    start = time.monotonic()
    while time.monotonic() - start < give_up:
        status = str(check_status(client, message_id, counter).get("deliverystatus"))
        if status in FINAL:
            return status
        time.sleep(interval)
    return "timeout"


def _track(
    client: httpx.Client,
    message_id: str,
    job: dict[str, Any],
    results: dict[str, dict[str, Any]],
) -> None:
    counter = _Counter()
    started_at = time.time()
    try:
        outcome = wait_for_delivery(
            client,
            message_id,
            counter,
            interval=float(job["interval"]),
            give_up=float(job["give_up"]),
        )
    except Exception:  # the documented loop lets the error escape: the caller sees "error"
        outcome = "error"
    results[message_id] = {
        "outcome": outcome,
        "started_at": started_at,
        "known_at": time.time(),
        "checks": counter.checks,
        "errors": counter.errors,
    }


def _cpu() -> float:
    """This process's CPU seconds so far (user + system, all threads)."""
    times = os.times()
    return times.user + times.system


def main() -> int:
    """Run the protocol in the module docstring."""
    print(json.dumps({"ready": True}), flush=True)
    ready_cpu = _cpu()
    line = sys.stdin.readline()
    if not line:
        return 1
    job: dict[str, Any] = json.loads(line)
    results: dict[str, dict[str, Any]] = {}
    with httpx.Client(
        base_url=job["base_url"],
        headers={"X-Authorization-Key": job["api_key"]},
        timeout=httpx.Timeout(float(job.get("read_timeout", 3.0)), connect=5.0),
    ) as client:
        threads = [
            threading.Thread(target=_track, args=(client, m, job, results), daemon=True)
            for m in job["ids"]
        ]
        for thread in threads:
            thread.start()
        # Bounded: every loop ends by give_up plus its last request and retries.
        limit = time.monotonic() + float(job["give_up"]) + 60.0
        for thread in threads:
            thread.join(max(0.0, limit - time.monotonic()))
    # A copy: a thread still in its last request must not change the dict mid-dump.
    cpu = {"ready": ready_cpu, "end": _cpu()}
    print(json.dumps({"results": dict(results), "cpu": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
