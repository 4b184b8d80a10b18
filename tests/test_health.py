"""A worker's health (celery/health.py): ``/healthz`` on its metrics port and the
``smsbat-tracker health`` command, through a Redis that goes away and comes back."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from bench.workload import free_port

from smsbat_tracker.celery.health import STALE_AFTER, Health, ping_options, serve
from smsbat_tracker.cli import main
from smsbat_tracker.config import Settings
from smsbat_tracker.tools.embedded import PersistentRedis
from smsbat_tracker.tools.workers import worker_process
from tests.conftest import wait_for


def _not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"other"]


def test_health_names_each_problem(redis_client: redis.Redis) -> None:
    """Healthy with Redis answering and a recent beat; a beat missing or older than
    STALE_AFTER, or a Redis out of reach, each is one line naming it."""
    beat: list[float | None] = [time.monotonic()]
    health = Health(lambda: redis_client, lambda: beat[0])
    assert health.problems() == []
    beat[0] = None
    assert health.problems() == ["re-driver: no beat has reached Redis yet"]
    beat[0] = time.monotonic() - STALE_AFTER - 1
    [stale] = health.problems()
    assert stale.startswith("re-driver: last beat 4.")
    away = redis.Redis(port=free_port(), **ping_options())
    beat[0] = time.monotonic()
    [problem] = Health(lambda: away, lambda: beat[0]).problems()
    assert problem.startswith("redis: ConnectionError: ")


def test_healthz_answers_beside_the_other_routes(redis_client: redis.Redis) -> None:
    """``/healthz`` is 200 ``ok`` or 503 with the problems; any other path is the wrapped
    app's (the metrics)."""
    beat: list[float | None] = [time.monotonic()]
    health = Health(lambda: redis_client, lambda: beat[0])
    port = free_port()
    server, _ = serve("127.0.0.1", port, health.wsgi(_not_found))
    try:
        base = f"http://127.0.0.1:{port}"
        ok = httpx.get(f"{base}/healthz")
        assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
        beat[0] = None
        down = httpx.get(f"{base}/healthz")
        assert down.status_code == 503
        assert down.json() == {
            "status": "down",
            "problems": ["re-driver: no beat has reached Redis yet"],
        }
        other = httpx.get(f"{base}/metrics")
        assert (other.status_code, other.text) == (404, "other")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_worker_is_unhealthy_within_5_s_of_losing_redis_and_healthy_once_it_is_back(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real worker on its own Redis: ``/healthz`` on its metrics port and
    ``smsbat-tracker health`` say ok while it beats; with Redis frozen (SIGSTOP: its
    connections hang) both fail within 5 s, and after it is woken both are ok again."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data, PersistentRedis(free_port(), data) as server:
        settings = make_settings(redis_url=server.url, metrics_port=port)
        monkeypatch.chdir(tmp_path)
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        url = f"http://127.0.0.1:{port}/healthz"

        def status() -> int:
            try:
                return httpx.get(url, timeout=5).status_code
            except httpx.HTTPError:
                return 0

        with worker_process(settings, concurrency=1, log_path=str(tmp_path / "worker.log")):
            wait_for(lambda: status() == 200, timeout=60)
            assert main(["health"]) == 0
            assert "worker: ok" in capsys.readouterr().out
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                frozen = time.monotonic()
                wait_for(lambda: status() == 503, timeout=10)
                assert time.monotonic() - frozen <= 5.0
                started = time.monotonic()
                assert main(["health"]) == 1
                assert time.monotonic() - started <= 5.0
                assert "redis: cannot reach" in capsys.readouterr().err
            finally:
                os.kill(server.pid, signal.SIGCONT)
            wait_for(lambda: status() == 200, timeout=30)
            monkeypatch.delenv("SMSBAT_METRICS_PORT")  # no port to ask: any worker's beat
            assert main(["health"]) == 0
            assert "worker: a re-driver beat" in capsys.readouterr().out
