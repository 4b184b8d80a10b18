"""Prometheus metrics: counted where things happen, served by a prefork worker and the receiver.

The endpoint tests scrape real servers (a ``celery worker`` subprocess with a prefork pool,
the webhook receiver under uvicorn) and parse what they serve with prometheus-client's own
parser.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from smsbat_tracker import metrics
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.errors import ConnectionFailed, RateLimited, ServerError
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.serving import BackgroundServer
from smsbat_tracker.tools.workers import worker_process
from smsbat_tracker.webhook import create_app
from tests.conftest import recorded, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"
TOKEN = "metrics-test-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def test_each_answer_is_counted_by_its_result() -> None:
    """2xx, 4xx, 429, 5xx and no answer at all are the five results of an API request."""
    counts = metrics.Metrics()
    for code in (200, 204, 404, 401, 429, 500, 503):
        counts.api_answer(code)
    counts.api_network_error()
    got = {
        r: counts.registry.get_sample_value("smsbat_api_requests_total", {"result": r})
        for r in ("2xx", "4xx", "429", "5xx", "network")
    }
    assert got == {"2xx": 2.0, "4xx": 2.0, "429": 1.0, "5xx": 2.0, "network": 1.0}


def test_the_client_counts_answers_and_requests_that_got_none() -> None:
    """The API client counts what each request got, whatever exception it then raises."""
    answers = iter([httpx.Response(503), httpx.Response(429, headers={"Retry-After": "1"})])

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            return next(answers)
        except StopIteration:
            raise httpx.ConnectError("refused", request=request) from None

    counter = metrics.get().api_requests
    before = {r: counter.labels(r)._value.get() for r in ("5xx", "429", "network")}
    client = SmsbatClient("https://api.test", api_key="k", transport=httpx.MockTransport(handler))
    with client:
        for expected in (ServerError, RateLimited, ConnectionFailed):
            with pytest.raises(expected):
                client.get_status("abc123")
    after = {r: counter.labels(r)._value.get() for r in ("5xx", "429", "network")}
    assert {r: after[r] - before[r] for r in after} == {"5xx": 1, "429": 1, "network": 1}


def test_an_outcome_is_counted_with_its_source_and_time_to_final() -> None:
    """The outcome's kind and source label it; its age since started_at goes to the histogram."""
    counts = metrics.Metrics()
    now = time.time()
    counts.outcome(
        {"outcome": "delivered", "source": "push", "started_at": "2026-12-01T00:00:00+00:00"},
        now=datetime(2026, 12, 1, tzinfo=UTC).timestamp() + 7.0,
    )
    counts.outcome({"outcome": "timeout", "source": None, "started_at": None}, now=now)
    registry = counts.registry
    assert (
        registry.get_sample_value(
            "smsbat_outcomes_total", {"outcome": "delivered", "source": "push"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("smsbat_outcomes_total", {"outcome": "timeout", "source": "none"})
        == 1
    )
    assert registry.get_sample_value(
        "smsbat_time_to_final_seconds_sum", {"outcome": "delivered"}
    ) == pytest.approx(7.0)
    assert (
        registry.get_sample_value("smsbat_time_to_final_seconds_count", {"outcome": "timeout"})
        is None
    )


def test_the_readme_names_every_metric() -> None:
    """Operators find every metric, and what it counts, in the README."""
    text = README.read_text()
    missing = [name for name in metrics.METRICS if f"`{name}" not in text]
    assert not missing


def test_every_exported_metric_is_listed() -> None:
    """METRICS (what the README is checked against) is exactly what a scrape can show."""
    text = metrics.exposition(metrics.Metrics().registry).decode()
    # (the _created series of unlabelled counters are prometheus-client's own)
    families = {
        f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }
    assert families | {"smsbat_trackings_in_flight"} == set(metrics.METRICS)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


@pytest.mark.slow
def test_a_prefork_worker_serves_what_all_its_processes_counted(
    make_settings: Callable[..., Settings],
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """SMSBAT_METRICS_PORT: the worker's parent adds up its children's counts when scraped.

    Six trackings across a two-child prefork pool: started, outcomes by kind and source,
    time to final and API answers all add up; the due index gauge reads 0 once they end.
    A stale file left in SMSBAT_METRICS_DIR by an earlier run is removed at start.
    """
    from bench.workload import free_port

    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = directory / "counter_99999.db"
    stale.write_bytes(b"not a metrics file")
    port = free_port()
    settings = make_settings(
        metrics_port=port, metrics_host="127.0.0.1", metrics_dir=str(directory)
    )
    tracker_app.reconfigure(settings)
    label = uuid.uuid4().hex[:8]
    plans = {
        "delivered": [("processing", 0), ("delivered", 0.5)],
        "undeliverable": [("processing", 0), ("undeliverable", 0.5)],
    }
    ids = {
        sandbox.state.create_scripted(plans[kind]): kind
        for kind in ("delivered",) * 4 + ("undeliverable",) * 2
    }
    with worker_process(settings, concurrency=2, pool="prefork"):
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        assert not stale.exists()
        for mid in ids:
            track_message.delay(
                mid,
                deadline=20,
                on_delivered=record_outcome.s(label=label),
                on_failed=record_outcome.s(label=label),
            )
        entries = wait_for(
            lambda: len(recorded(redis_client, label)) == 6 and recorded(redis_client, label),
            timeout=40,
        )
        wait_for(lambda: redis_client.zcard("smsbat:due") == 0, timeout=10)
        got = scrape(f"http://127.0.0.1:{port}/metrics")
        assert len({p.name for p in directory.glob("*.db")}) >= 2  # the children's own files
    assert {e["result"]["message_id"]: e["result"]["outcome"] for e in entries} == ids
    assert value(got, "smsbat_trackings_started_total") == 6
    assert value(got, "smsbat_outcomes_total", outcome="delivered", source="poll") == 4
    assert value(got, "smsbat_outcomes_total", outcome="undeliverable", source="poll") == 2
    assert value(got, "smsbat_time_to_final_seconds_count", outcome="delivered") == 4
    assert value(got, "smsbat_time_to_final_seconds_bucket", outcome="delivered", le="+Inf") == 4
    assert value(got, "smsbat_api_requests_total", result="2xx") >= 6
    assert value(got, "smsbat_api_requests_total", result="5xx") == 0
    assert value(got, "smsbat_trackings_in_flight") == 0


@pytest.mark.slow
def test_a_worker_whose_metrics_port_is_taken_stops_with_one_line(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Start-up stops with the variable's name, not a traceback, when the port is in use."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(metrics_port=port, metrics_host="127.0.0.1")
        log = tmp_path / "worker.log"
        with worker_process(settings, concurrency=1, pool="solo", log_path=str(log)) as proc:
            code = proc.wait(timeout=60)
    text = log.read_text()
    assert code != 0
    assert f"SMSBAT_METRICS_PORT={port}: cannot serve metrics" in text
    assert "Traceback" not in text


def test_the_receiver_serves_its_push_counts_on_metrics(
    make_settings: Callable[..., Settings], tracker_app: Any
) -> None:
    """GET /metrics on the receiver: each push counted by what became of it."""
    receiver_settings = make_settings(webhook_token=TOKEN)
    settled: list[str] = []
    mid = f"m{uuid.uuid4().hex[:10]}"
    push = {
        "messageId": mid,
        "deliverystatus": "processing",
        "timestamp": "2026-12-01T00:00:00+00:00",
    }
    application = create_app(receiver_settings, settle=settled.append)
    with BackgroundServer(application, lifespan="on") as server:  # its shutdown closes it
        url = f"{server.url}/metrics"
        before = scrape(url)
        headers = {"X-Webhook-Token": TOKEN}
        assert httpx.post(f"{server.url}/webhook", json=push, headers=headers).status_code == 200
        older = {**push, "timestamp": "2026-11-30T00:00:00+00:00"}  # older: not stored
        assert httpx.post(f"{server.url}/webhook", json=older, headers=headers).status_code == 200
        assert httpx.post(f"{server.url}/webhook", json=push).status_code == 401
        assert (
            httpx.post(
                f"{server.url}/webhook",
                content=b"[",
                headers={**headers, "Content-Type": "application/json"},
            ).status_code
            == 400
        )
        after = scrape(url)
    delta = {
        r: value(after, "smsbat_webhook_pushes_total", result=r)
        - value(before, "smsbat_webhook_pushes_total", result=r)
        for r in ("stored", "ignored", "unauthorized", "rejected", "unavailable")
    }
    assert delta == {"stored": 1, "ignored": 1, "unauthorized": 1, "rejected": 1, "unavailable": 0}
