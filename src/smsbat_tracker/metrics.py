"""Prometheus metrics: what the tracker did, for dashboards and alerts.

Counters and histograms are counted where things happen (a tracker run, the API clients,
the webhook receiver, the re-driver). A worker serves them on ``SMSBAT_METRICS_PORT``;
with a prefork pool its children count into prometheus-client's multiprocess directory
(:func:`use_directory`, emptied when the worker starts), and the worker's parent process
adds them up when scraped. The receiver serves its own on ``/metrics``.

What describes Redis rather than a process (the trackings in flight) is read from Redis
when scraped (:class:`RedisCollector`): a killed process never leaves it wrong.

Every metric is named in :data:`METRICS`, and the README lists them.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "METRICS",
    "Metrics",
    "RedisCollector",
    "exposition",
    "get",
    "scrape_registry",
    "use_directory",
]

# Seconds from the tracking's start to its outcome: the provider's advice is 60-120 s.
TIME_TO_FINAL_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)

# Every metric this module exports (without the _total / _bucket suffixes), with its help.
METRICS: Final[Mapping[str, str]] = {
    "smsbat_trackings_started": "track_message trackings whose first run started",
    "smsbat_outcomes": "Trackings ended, by outcome and source (poll, push, none)",
    "smsbat_time_to_final_seconds": "Seconds from a tracking's start to its outcome",
    "smsbat_api_requests": "SMSBAT API requests, by result (2xx, 4xx, 429, 5xx, network)",
    "smsbat_ratelimit_waits": (
        "Checks that waited for the global rate limit: slept for a token due soon, "
        "or deferred to a later run"
    ),
    "smsbat_redrives": (
        "Work the re-driver gave back: lost runs re-sent (run), a dead worker's tasks "
        "restored (restored), lost follow-ups re-sent (follow_up)"
    ),
    "smsbat_trackings_in_flight": (
        "Entries in the due index: trackings in flight, plus one per running campaign "
        "tick chain (read from Redis when scraped)"
    ),
    "smsbat_webhook_pushes": (
        "Pushes received, by result (stored, ignored, unauthorized, rejected, unavailable)"
    ),
    "smsbat_campaigns_started": "Campaigns started",
    "smsbat_campaign_messages": "Messages in the campaigns started",
    "smsbat_campaign_outcomes": "Campaign messages ended, by outcome",
    "smsbat_campaigns_finished": "Campaigns whose report was written",
}

_DIRECTORY_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """This process's counters and histograms, on their own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, METRICS[name], list(labels), registry=registry)

        self.started = counter("smsbat_trackings_started")
        self.outcomes = counter("smsbat_outcomes", ["outcome", "source"])
        self.time_to_final = Histogram(
            "smsbat_time_to_final_seconds",
            METRICS["smsbat_time_to_final_seconds"],
            ["outcome"],
            buckets=TIME_TO_FINAL_BUCKETS,
            registry=registry,
        )
        self.api_requests = counter("smsbat_api_requests", ["result"])
        self.rate_waits = counter("smsbat_ratelimit_waits", ["how"])
        self.redrives = counter("smsbat_redrives", ["kind"])
        self.pushes = counter("smsbat_webhook_pushes", ["result"])
        self.campaigns_started = counter("smsbat_campaigns_started")
        self.campaign_messages = counter("smsbat_campaign_messages")
        self.campaign_outcomes = counter("smsbat_campaign_outcomes", ["outcome"])
        self.campaigns_finished = counter("smsbat_campaigns_finished")

    # --- what the rest of the package calls ----------------------------------------------

    def api_answer(self, code: int) -> None:
        """Count one API answer by its HTTP status."""
        if code == 429:
            result = "429"
        elif 200 <= code < 300:
            result = "2xx"
        elif 400 <= code < 500:
            result = "4xx"
        elif code >= 500:
            result = "5xx"
        else:  # 1xx / 3xx: the client follows no redirects; an answer all the same
            result = "4xx"
        self.api_requests.labels(result).inc()

    def api_network_error(self) -> None:
        """Count one API request that got no answer (connection, timeout, cut-off body)."""
        self.api_requests.labels("network").inc()

    def outcome(self, result: Mapping[str, Any], *, now: float) -> None:
        """Count one tracking's recorded outcome and its time to final."""
        outcome = str(result.get("outcome"))
        self.outcomes.labels(outcome, str(result.get("source") or "none")).inc()
        started = result.get("started_at")
        if isinstance(started, str):
            try:
                elapsed = now - datetime.fromisoformat(started).timestamp()
            except ValueError:
                return
            self.time_to_final.labels(outcome).observe(max(0.0, elapsed))


class _Current:
    """This process's metrics, once built."""

    lock = threading.Lock()
    metrics: Metrics | None = None


def get() -> Metrics:
    """This process's :class:`Metrics`, built on first use."""
    metrics = _Current.metrics
    if metrics is None:
        with _Current.lock:
            if _Current.metrics is None:
                _Current.metrics = Metrics()
            metrics = _Current.metrics
    return metrics


def use_directory(directory: str | os.PathLike[str]) -> Path:
    """Count into prometheus-client's multiprocess ``directory`` from now on.

    Call in a worker's parent before its pool starts: the children inherit it and each
    counts into files of its own, which :func:`scrape_registry` adds up. The directory is
    emptied first (the counts of an earlier run would add to this one's). Metrics counted
    in this process before are dropped.
    """
    path = Path(directory)
    if path.exists():
        for entry in path.iterdir():
            if entry.suffix == ".db":
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    with _Current.lock:
        os.environ[_DIRECTORY_ENV] = str(path)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _Current.metrics = None
    return path


def directory() -> Path | None:
    """The multiprocess directory in use in this process, if any."""
    value = os.environ.get(_DIRECTORY_ENV)
    return Path(value) if value and values.ValueClass is not values.MutexValue else None


def remove_directory(path: Path) -> None:
    """Delete a multiprocess directory this worker made (at its shutdown)."""
    shutil.rmtree(path, ignore_errors=True)


class RedisCollector(Collector):
    """Gauges read from Redis when scraped: the due index's size."""

    def __init__(self, client: Callable[[], redis.Redis], due_key: str) -> None:
        self._client = client
        self._due_key = due_key

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            in_flight = int(self._client().zcard(self._due_key))
        except (redis.RedisError, OSError):
            return  # Redis away: no sample rather than a wrong one
        yield GaugeMetricFamily(
            "smsbat_trackings_in_flight", METRICS["smsbat_trackings_in_flight"], value=in_flight
        )


def scrape_registry(*extra: Collector) -> CollectorRegistry:
    """What a scrape of this process serves: its own metrics, or every process's when a
    multiprocess directory is in use, plus ``extra`` collectors."""
    path = directory()
    if path is None:
        registry = get().registry
        for collector in extra:
            registry.register(collector)
        return registry
    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus's text format (:data:`CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry)
