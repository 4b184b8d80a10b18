"""The webhook receiver, served by uvicorn, against a real Redis (and a real worker where the
Celery path matters)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr
from structlog.testing import capture_logs

from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import iso
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer
from smsbat_tracker.tools.serving import ASGIApp, BackgroundServer, Receive, Scope, Send
from smsbat_tracker.webhook import LazyWebhookApp, create_app
from smsbat_tracker.webhook.auth import TOKEN_HEADER
from smsbat_tracker.webhook.limiter import APPLY_THREADS, ApplySlots
from smsbat_tracker.webhook.schema import MAX_BODY_BYTES
from tests.conftest import kept, recorded, wait_for

TOKEN = "tok-123-secret"
JSON = {"Content-Type": "application/json"}
STATUS_KEYS = "smsbat:status:*"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Settings with the webhook token, shared by the Celery app and the webhook.

    The first check comes 1 s after the enqueue and the next one 3 s later, so that an
    outcome arriving within a few hundred milliseconds of a push can only come from the push.
    """
    return make_settings(webhook_token=TOKEN, first_delay=1.0, backoff_factor=3.0, max_delay=3.0)


@dataclass
class Hook:
    """A served webhook and the ids it asked to settle (stub enqueue) if any."""

    url: str
    settled: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.url}/webhook"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An HTTP client, closed after the test."""
    with httpx.Client(timeout=10.0) as client:
        yield client


class Swappable:
    """An ASGI app forwarding to ``target``: one served socket, a fresh webhook per test."""

    def __init__(self) -> None:
        self.target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.target is not None
        await self.target(scope, receive, send)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[tuple[str, Swappable]]:
    """One uvicorn for the module's stub-enqueue tests (starting one per test costs ~0.2 s)."""
    swappable = Swappable()
    with BackgroundServer(swappable) as server:
        yield server.url, swappable


@pytest.fixture
def hook(
    settings: Settings, tracker_app: Any, shared_server: tuple[str, Swappable]
) -> Iterator[Hook]:
    """The webhook on the Celery app's engine, with the settle enqueue recorded, not sent."""
    url, swappable = shared_server
    settled: list[str] = []
    swappable.target = create_app(settings, settle=settled.append)
    yield Hook(url, settled)
    swappable.target = None


@pytest.fixture
def live_hook(settings: Settings, worker: Any) -> Iterator[Hook]:
    """The webhook as deployed: it settles final pushes itself, for the real worker."""
    with BackgroundServer(create_app(settings)) as server:
        yield Hook(server.url)


def now_iso(offset: float = 0.0) -> str:
    stamp = iso(time.time() + offset)
    assert stamp is not None
    return stamp


def body(message_id: str = "abc123", status: str = "delivered", **extra: Any) -> dict[str, Any]:
    return {"messageId": message_id, "deliverystatus": status, "timestamp": now_iso(), **extra}


def push(
    client: httpx.Client, hook: Hook, payload: dict[str, Any], token: str | None = TOKEN
) -> httpx.Response:
    params = {"token": token} if token is not None else {}
    return client.post(hook.endpoint, params=params, json=payload)


def status_keys(client: redis.Redis) -> list[str]:
    return list(client.scan_iter(STATUS_KEYS))


def outcomes(client: redis.Redis, label: str) -> list[dict[str, Any]]:
    return [entry["result"] for entry in recorded(client, label)]


def cached_status(engine: Engine, message_id: str) -> str | None:
    cached = engine.cache.get(message_id)
    return cached.status.deliverystatus if cached else None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------- authentication


def test_token_in_query_is_accepted(
    http: httpx.Client, hook: Hook, redis_client: redis.Redis, tracker_app: Any
) -> None:
    """?token=<secret> authenticates; a final push is stored and its settle enqueued."""
    response = push(http, hook, body("q1", cost=0.05))
    assert response.status_code == 200
    assert response.json() == {"status": "stored", "final": True}
    cached = tracker_app.engine.cache.get("q1")
    assert cached.source == "push"
    assert cached.status.cost == pytest.approx(0.05)
    assert hook.settled == ["q1"]


def test_token_in_header_is_accepted(http: httpx.Client, hook: Hook, tracker_app: Any) -> None:
    """X-Webhook-Token authenticates too; a non-final push is stored and settles nothing."""
    response = http.post(
        hook.endpoint, json=body("h1", "processing"), headers={"X-Webhook-Token": TOKEN}
    )
    assert response.status_code == 200
    assert response.json() == {"status": "stored", "final": False}
    assert cached_status(tracker_app.engine, "h1") == "processing"
    assert hook.settled == []


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        pytest.param({}, {}, id="missing"),
        pytest.param({"token": "wrong"}, {}, id="wrong-query"),
        pytest.param({}, {"X-Webhook-Token": "wrong"}, id="wrong-header"),
        pytest.param({"token": ""}, {}, id="empty"),
        pytest.param({"token": TOKEN[:-1]}, {}, id="prefix"),
        pytest.param({"token": TOKEN + "x"}, {}, id="longer"),
        pytest.param({"token": TOKEN.upper()}, {}, id="case"),
        pytest.param({"tok": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}, id="elsewhere"),
        pytest.param({"token": "wrong"}, {"X-Webhook-Token": TOKEN}, id="right-header-wrong-query"),
        pytest.param({"token": TOKEN}, {"X-Webhook-Token": "wrong"}, id="right-query-wrong-header"),
        pytest.param([("token", TOKEN), ("token", "wrong")], {}, id="second-query-wrong"),
    ],
)
def test_missing_or_wrong_token_is_401_and_stores_nothing(
    http: httpx.Client,
    hook: Hook,
    redis_client: redis.Redis,
    params: dict[str, str] | list[tuple[str, str]],
    headers: dict[str, str],
) -> None:
    """Without the exact token, in every place a token is given: 401 {"error":
    "unauthorized"}, no status key, no settle."""
    response = http.post(hook.endpoint, params=params, headers=headers, json=body("u1"))
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert status_keys(redis_client) == []
    assert hook.settled == []


def test_auth_is_checked_before_the_body(http: httpx.Client, hook: Hook) -> None:
    """An unauthenticated request gets 401 even with a bad media type or an oversized body."""
    big = b"x" * (MAX_BODY_BYTES * 4)
    bad_type = http.post(hook.endpoint, content=b"{}", headers={"Content-Type": "text/plain"})
    oversized = http.post(hook.endpoint, params={"token": "no"}, content=big, headers=JSON)
    assert bad_type.status_code == oversized.status_code == 401


def test_token_is_never_logged(http: httpx.Client, hook: Hook) -> None:
    """Accepted and refused pushes log events that never contain the token."""
    with capture_logs() as logs:
        push(http, hook, body("log1"))
        push(http, hook, body("log2"), token=TOKEN + "x")
        http.post(hook.endpoint, params={"token": TOKEN}, content=b"[", headers=JSON)
    [event] = [e for e in logs if e["event"] == "webhook.push"]
    assert event["message_id"] == "log1"
    assert event["stored"] is True
    assert event["final"] is True
    assert TOKEN not in repr(logs)


def test_refuses_to_build_without_a_token(make_settings: Callable[..., Settings]) -> None:
    """No SMSBAT_WEBHOOK_TOKEN (or an empty one) and not open: ConfigError naming it."""
    for settings in (make_settings(), make_settings(webhook_token="")):
        with pytest.raises(ConfigError, match="SMSBAT_WEBHOOK_TOKEN"):
            create_app(settings, settle=lambda _mid: None)


def test_open_mode_accepts_any_request_and_warns(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, http: httpx.Client
) -> None:
    """SMSBAT_WEBHOOK_OPEN without a token: a warning at start-up, pushes need no token.

    The settings are not the Celery app's, so the webhook builds (and closes) its own engine.
    """
    settings = make_settings(webhook_open=True)
    settled: list[str] = []
    with capture_logs() as logs:
        application = create_app(settings, settle=settled.append)
    assert [e["log_level"] for e in logs if e["event"] == "webhook.open"] == ["warning"]
    receiver = application.state.receiver
    try:
        with BackgroundServer(application) as server:
            response = http.post(f"{server.url}/webhook", json=body("open1"))
        assert response.json() == {"status": "stored", "final": True}
        assert redis_client.exists("smsbat:status:{open1}")
        assert settled == ["open1"]
    finally:
        receiver.close()


# --------------------------------------------------------------------- validation

_MISSING = object()


def payload(**changes: Any) -> bytes:
    """A valid push with fields changed (or removed with ``_MISSING``), as JSON bytes."""
    data: dict[str, Any] = {**body("v1"), "cost": 0.05}
    for name, value in changes.items():
        if value is _MISSING:
            data.pop(name, None)
        else:
            data[name] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("content_type", "content", "status", "field_name"),
    [
        pytest.param("text/plain", payload(), 415, None, id="text-plain"),
        pytest.param(None, payload(), 415, None, id="no-content-type"),
        pytest.param("application/jsonx", payload(), 415, None, id="other-json-ish"),
        pytest.param("application/json; charset=latin-1", payload(), 415, None, id="charset"),
        pytest.param("application/json; foo=bar", payload(), 415, None, id="param"),
        pytest.param("application/json", b'{"messageId": ', 400, None, id="bad-json"),
        pytest.param("application/json", b"", 400, None, id="empty"),
        pytest.param("application/json", b"\xff\xfe{}", 400, None, id="not-utf8"),
        pytest.param("application/json", b'{"cost": NaN}', 400, None, id="nan"),
        pytest.param("application/json", b"[" * 50_000, 400, None, id="deep"),
        pytest.param("application/json", b"[]", 400, None, id="array"),
        pytest.param("application/json", b'"text"', 400, None, id="string"),
        pytest.param("application/json", b"null", 400, None, id="null"),
        pytest.param("application/json", payload(messageId=_MISSING), 422, "messageId", id="id-"),
        pytest.param("application/json", payload(messageId=7), 422, "messageId", id="id-int"),
        pytest.param("application/json", payload(messageId=""), 422, "messageId", id="id-empty"),
        pytest.param("application/json", payload(messageId="../x"), 422, "messageId", id="id-.."),
        pytest.param("application/json", payload(messageId="a" * 129), 422, "messageId", id="id-L"),
        pytest.param(
            "application/json", payload(deliverystatus=_MISSING), 422, "deliverystatus", id="st-"
        ),
        pytest.param(
            "application/json", payload(deliverystatus=""), 422, "deliverystatus", id="st-empty"
        ),
        pytest.param(
            "application/json", payload(deliverystatus=3), 422, "deliverystatus", id="st-int"
        ),
        pytest.param(
            "application/json", payload(deliverystatus="d" * 65), 422, "deliverystatus", id="st-L"
        ),
        pytest.param(
            "application/json", payload(deliverystatus="a b"), 422, "deliverystatus", id="st-sp"
        ),
        pytest.param("application/json", payload(timestamp=_MISSING), 422, "timestamp", id="ts-"),
        pytest.param(
            "application/json",
            payload(timestamp="2025-01-23T10:30:00"),
            422,
            "timestamp",
            id="ts-n",
        ),
        pytest.param(
            "application/json", payload(timestamp="2025-01-23"), 422, "timestamp", id="ts-date"
        ),
        pytest.param("application/json", payload(timestamp="soon"), 422, "timestamp", id="ts-x"),
        pytest.param(
            "application/json", payload(timestamp=1737628200), 422, "timestamp", id="ts-#"
        ),
        pytest.param("application/json", payload(cost="0.05"), 422, "cost", id="cost-str"),
        pytest.param("application/json", payload(cost=True), 422, "cost", id="cost-bool"),
        pytest.param("application/json", payload(cost=[1]), 422, "cost", id="cost-list"),
        pytest.param(
            "application/json", payload().replace(b"0.05", b"1e999"), 422, "cost", id="cost-inf"
        ),
        pytest.param(
            "application/json",
            payload().replace(b"0.05", b"9" * 400),
            422,
            "cost",
            id="cost-huge-int",
        ),
    ],
)
def test_invalid_requests_are_refused_and_store_nothing(
    http: httpx.Client,
    hook: Hook,
    redis_client: redis.Redis,
    content_type: str | None,
    content: bytes,
    status: int,
    field_name: str | None,
) -> None:
    """415 media type, 400 not a JSON object, 422 naming the bad field; never stored."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post(hook.endpoint, params={"token": TOKEN}, content=content, headers=headers)
    assert response.status_code == status
    answer = response.json()
    assert answer["field"] == field_name
    assert isinstance(answer["error"], str)
    assert answer["error"]
    assert status_keys(redis_client) == []
    assert hook.settled == []


@pytest.mark.parametrize(
    ("content_type", "content", "deliverystatus"),
    [
        pytest.param("application/json; charset=UTF-8", payload(), "delivered", id="charset"),
        pytest.param('APPLICATION/JSON;charset="utf8"', payload(), "delivered", id="quoted"),
        pytest.param("application/json", payload(cost=None), "delivered", id="cost-null"),
        pytest.param("application/json", payload(cost=_MISSING), "delivered", id="cost-absent"),
        pytest.param("application/json", payload(cost=3), "delivered", id="cost-int"),
        pytest.param(
            "application/json", payload(extra={"a": [1, 2]}, rate=1), "delivered", id="extras"
        ),
        pytest.param(
            "application/json",
            payload(timestamp="2025-01-23T12:30:00.123456+02:00"),
            "delivered",
            id="offset",
        ),
        pytest.param(
            "application/json",
            payload(deliverystatus="queued_at_carrier"),
            "queued_at_carrier",
            id="unknown-status",
        ),
    ],
)
def test_valid_variants_are_accepted(
    http: httpx.Client,
    hook: Hook,
    tracker_app: Any,
    content_type: str,
    content: bytes,
    deliverystatus: str,
) -> None:
    """Charset, null or absent cost, extra fields, offsets and unknown statuses are fine.

    An unknown status is kept as sent and is not final.
    """
    response = http.post(
        hook.endpoint,
        params={"token": TOKEN},
        content=content,
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 200, response.text
    final = deliverystatus == "delivered"
    assert response.json() == {"status": "stored", "final": final}
    assert cached_status(tracker_app.engine, "v1") == deliverystatus
    assert hook.settled == (["v1"] if final else [])


def _raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    """Send only a request head over a socket; return the status and the answer's body."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the answer"
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    return int(header.split(b" ", 2)[1]), rest[:length]


def test_oversized_content_length_is_refused_at_once(hook: Hook, redis_client: redis.Redis) -> None:
    """A Content-Length above 64 KiB gets 413 before a single body byte is sent."""
    head = (
        f"POST /webhook?token={TOKEN} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    ).encode()
    status, answer = _raw_request(hook.url, head)
    assert status == 413
    assert json.loads(answer)["field"] is None
    assert status_keys(redis_client) == []


def _padded(total: int) -> bytes:
    """A valid push padded with an extra field to exactly ``total`` bytes."""
    base = payload(pad="")
    return payload(pad="x" * (total - len(base)))


def _chunks(content: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


def test_streamed_body_over_the_limit_is_refused(
    http: httpx.Client, hook: Hook, redis_client: redis.Redis
) -> None:
    """Without Content-Length (chunked), the limit is enforced while reading: 413."""
    content = _padded(MAX_BODY_BYTES + 1)
    assert len(content) == MAX_BODY_BYTES + 1
    response = http.post(
        hook.endpoint, params={"token": TOKEN}, content=_chunks(content), headers=JSON
    )
    assert response.status_code == 413
    assert status_keys(redis_client) == []


def test_body_of_exactly_the_limit_is_accepted(
    http: httpx.Client, hook: Hook, tracker_app: Any
) -> None:
    """64 KiB exactly is allowed, with and without Content-Length."""
    content = _padded(MAX_BODY_BYTES)
    assert len(content) == MAX_BODY_BYTES
    sized = http.post(hook.endpoint, params={"token": TOKEN}, content=content, headers=JSON)
    chunked = http.post(
        hook.endpoint, params={"token": TOKEN}, content=_chunks(content), headers=JSON
    )
    assert sized.status_code == chunked.status_code == 200
    assert cached_status(tracker_app.engine, "v1") == "delivered"


# --------------------------------------------------------------------- ordering


def test_duplicate_push_is_ignored(http: httpx.Client, hook: Hook, tracker_app: Any) -> None:
    """The same final push twice: stored then ignored; both settle (exactly-once downstream).

    Settling the duplicate lets the provider's retry finish a settle that failed the first
    time; the Celery-path test below shows a duplicate fires no second callback.
    """
    first = push(http, hook, body("dup1"))
    second = push(http, hook, body("dup1"))
    assert first.json() == {"status": "stored", "final": True}
    assert second.status_code == 200
    assert second.json() == {"status": "ignored", "final": True}
    assert hook.settled == ["dup1", "dup1"]
    assert [h.deliverystatus for h in tracker_app.engine.cache.history("dup1")] == ["delivered"]


def test_out_of_order_pushes_keep_the_newest(
    http: httpx.Client, hook: Hook, tracker_app: Any
) -> None:
    """Older pushes never overwrite newer ones; a final status is never overwritten."""
    engine = tracker_app.engine
    base = time.time()

    def at(message_id: str, status: str, offset: float) -> dict[str, Any]:
        return {**body(message_id, status), "timestamp": iso(base + offset)}

    # a late "processing" after "delivered": ignored
    assert push(http, hook, at("o1", "delivered", 0)).json()["status"] == "stored"
    assert push(http, hook, at("o1", "processing", -10)).json() == {
        "status": "ignored",
        "final": False,
    }
    assert cached_status(engine, "o1") == "delivered"
    # non-final after older non-final: stored; older non-final after newer: ignored
    assert push(http, hook, at("o2", "scheduled", -5)).json()["status"] == "stored"
    assert push(http, hook, at("o2", "processing", 0)).json()["status"] == "stored"
    assert cached_status(engine, "o2") == "processing"
    assert push(http, hook, at("o2", "scheduled", -3)).json()["status"] == "ignored"
    assert cached_status(engine, "o2") == "processing"
    # a final status ends the message even when its timestamp is older
    assert push(http, hook, at("o2", "undeliverable", -20)).json() == {
        "status": "stored",
        "final": True,
    }
    assert cached_status(engine, "o2") == "undeliverable"
    # ... and a newer non-final one afterwards cannot undo it
    assert push(http, hook, at("o2", "processing", 60)).json()["status"] == "ignored"
    assert cached_status(engine, "o2") == "undeliverable"
    assert hook.settled == ["o1", "o2"]


def test_a_push_after_the_outcome_is_ignored_and_counted_so(
    http: httpx.Client,
    live_hook: Hook,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    tracker_app: Any,
) -> None:
    """Once a message's outcome is recorded (and its tracking cut back to it), a push that
    is older than the outcome or contradicts it answers "ignored", counts as ignored, and
    changes neither the outcome nor what get_status answers."""
    from smsbat_tracker import metrics

    mid = sandbox.state.create_scripted([("delivered", 0)])
    track_message.delay(mid, on_delivered=record_outcome.s(label="late"))
    [entry] = wait_for(lambda: recorded(redis_client, "late"))
    assert entry["result"]["outcome"] == "delivered"
    wait_for(lambda: redis_client.exists(Keys().outcome(mid)))
    registry = metrics.get().registry

    def ignored() -> float:
        return (
            registry.get_sample_value("smsbat_webhook_pushes_total", {"result": "ignored"}) or 0.0
        )

    before = ignored()
    for late in (
        body(mid, "undeliverable"),
        {**body(mid, "processing"), "timestamp": now_iso(-60)},
    ):
        answer = push(http, live_hook, late)
        assert answer.json()["status"] == "ignored", late
    assert ignored() == before + 2
    assert tracker_app.engine.get_status(mid).deliverystatus == "delivered"
    assert tracker_app.engine.outcome(mid)["outcome"] == "delivered"  # type: ignore[index]


# --------------------------------------------------------------------- the Celery path


def test_push_before_track_finishes_at_once(
    http: httpx.Client,
    live_hook: Hook,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    """A final push for an untracked id is kept; tracking it later needs no API request."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    assert push(http, live_hook, body(mid)).json() == {"status": "stored", "final": True}
    enqueued_at = time.time()
    track_message.delay(mid, on_delivered=record_outcome.s(label="pbt"))
    [entry] = wait_for(lambda: recorded(redis_client, "pbt"))
    result = entry["result"]
    assert result["outcome"] == "delivered"
    assert result["polls"] == 0
    assert result["source"] == "push"
    assert entry["recorded_at"] - enqueued_at < settings.first_delay  # before any check
    assert sandbox.state.truth(mid)["polls"] == 0


def test_the_receiver_needs_no_provider_credentials(
    http: httpx.Client,
    make_settings: Callable[..., Settings],
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """Without any SMSBAT_API_KEY or login the receiver starts, stores pushes and ends
    trackings (it never calls the provider)."""
    settings = make_settings(credentials=False, api_key="", webhook_token=TOKEN)
    assert not settings.has_credentials
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    track_message.delay(mid, on_delivered=record_outcome.s(label="nocreds"))
    with BackgroundServer(create_app(settings)) as server:
        answer = push(http, Hook(server.url), body(mid))
    assert answer.json() == {"status": "stored", "final": True}
    [entry] = wait_for(lambda: recorded(redis_client, "nocreds"))
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["source"] == "push"


def test_push_ends_a_running_tracker(
    http: httpx.Client,
    live_hook: Hook,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    """A final push ends a tracker between two checks: one callback, promptly, no more polls."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    sig = record_outcome.s(label="run")
    # Results are not stored by default; this test opts in to watch the task finish.
    task = track_message.apply_async(
        (mid,),
        {"deadline": 30, "on_delivered": sig, "on_failed": sig, "on_timeout": sig},
        ignore_result=False,
    )
    wait_for(lambda: sandbox.state.truth(mid)["polls"] >= 1, timeout=5)
    polls = sandbox.state.truth(mid)["polls"]
    pushed_at = time.time()
    assert push(http, live_hook, body(mid, cost=0.07)).json() == {"status": "stored", "final": True}
    [entry] = wait_for(lambda: recorded(redis_client, "run"), timeout=5)
    # The next check is backoff_factor x first_delay (3 s) after the first: this came from
    # the push.
    assert entry["recorded_at"] - pushed_at < 1.0
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["cost"] == pytest.approx(0.07)
    # The provider's duplicate: acknowledged, and it fires nothing more.
    assert push(http, live_hook, body(mid)).json()["final"] is True
    # The tracker's pending wake-up (at most max_delay away) runs, finds the outcome and
    # returns without a request.
    wait_for(task.ready, timeout=settings.max_delay + 5)
    assert task.result["outcome"] == "delivered"
    wait_for(lambda: redis_client.llen("celery") == 0)
    assert sandbox.state.truth(mid)["polls"] == polls
    assert len(recorded(redis_client, "run")) == 1
    # What the message keeps: its outcome alone (the duplicate's cache entry dropped too).
    assert wait_for(lambda: kept(redis_client, mid)[0] == {"outcome"}, timeout=5)
    assert len(recorded(redis_client, "run")) == 1


def test_sandbox_pushes_end_tracking(
    live_hook: Hook, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """The sandbox configured with the webhook URL pushes; the callback fires with no poll.

    The pushing sandbox plays the provider's push side; the polled sandbox holds the same
    message, so a poll would see it too (none happens: the first check is 1 s away).
    """
    mid = f"push{uuid.uuid4().hex[:12]}"
    timeline = [("processing", 0.0), ("delivered", 0.2)]
    config = SandboxConfig(push_url=f"{live_hook.endpoint}?token={TOKEN}")
    with SandboxServer(config) as provider:
        provider.state.create_scripted(timeline, message_id=mid, cost=0.03)
        sandbox.state.create_scripted(timeline, message_id=mid, cost=0.03)
        track_message.delay(mid, on_delivered=record_outcome.s(label="sp"))
        [result] = wait_for(lambda: outcomes(redis_client, "sp"), timeout=5)
        pushes = wait_for(lambda: provider.state.truth(mid)["pushes"])
    assert result["outcome"] == "delivered"
    assert result["source"] == "push"
    assert result["polls"] == 0
    assert result["cost"] == pytest.approx(0.03)
    assert [(p["deliverystatus"], p["http_status"]) for p in pushes] == [("delivered", 200)]
    assert sandbox.state.truth(mid)["polls"] == 0


# --------------------------------------------------------------------- health, OpenAPI


def test_healthz_ok(http: httpx.Client, hook: Hook) -> None:
    """/healthz answers 200 {"status": "ok"} while Redis answers PING."""
    response = http.get(f"{hook.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_redis_down_is_503(http: httpx.Client, settings: Settings) -> None:
    """With Redis unreachable, /healthz and a valid push answer 503, never 500."""
    dead = Engine(
        settings,
        redis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0", decode_responses=True),
        SmsbatClient.from_settings(settings),
    )
    try:
        application = create_app(settings, engine=dead, settle=lambda _mid: None)
        with BackgroundServer(application) as server:
            health = http.get(f"{server.url}/healthz")
            pushed = http.post(f"{server.url}/webhook", params={"token": TOKEN}, json=body("d1"))
    finally:
        dead.api.close()
        dead.redis.close()
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable"}
    assert pushed.status_code == 503
    assert pushed.json()["error"] == "unavailable"


def test_a_failed_settle_is_finished_by_the_providers_retry(
    http: httpx.Client, settings: Settings, tracker_app: Any, shared_server: tuple[str, Swappable]
) -> None:
    """A settle that fails answers 503; the retried push, a duplicate, settles after all."""
    url, swappable = shared_server
    settled: list[str] = []

    def flaky(message_id: str) -> None:
        if not settled:
            settled.append("failed")
            raise redis.ConnectionError("broker unreachable")
        settled.append(message_id)

    swappable.target = create_app(settings, settle=flaky)
    try:
        first = http.post(f"{url}/webhook", params={"token": TOKEN}, json=body("fs1"))
        retry = http.post(f"{url}/webhook", params={"token": TOKEN}, json=body("fs1"))
    finally:
        swappable.target = None
    assert first.status_code == 503
    assert retry.json() == {"status": "ignored", "final": True}  # stored the first time
    assert settled == ["failed", "fs1"]


def test_a_failed_settle_gives_its_claim_back_to_the_providers_retry(
    http: httpx.Client,
    settings: Settings,
    tracker_app: Any,
    redis_client: redis.Redis,
    shared_server: tuple[str, Swappable],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the real engine: a final push whose callback cannot be sent answers 503 and
    gives its claim back, so the provider's retry (a new claimer) sends it at once."""
    from celery.canvas import Signature
    from kombu.exceptions import OperationalError

    from smsbat_tracker.celery.track import track_message

    url, swappable = shared_server
    track_message.apply_async(
        ("realsettle",), {"on_delivered": record_outcome.s(label="real")}, countdown=60
    )
    sent: list[Any] = []
    original = Signature.apply_async

    def broker_down_once(self: Signature, *args: Any, **kwargs: Any) -> Any:
        if self.task == "smsbat_tracker.recipes.record_outcome" and not sent:
            sent.append("refused")
            raise OperationalError("broker unreachable")
        sent.append(self.task)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", broker_down_once)
    swappable.target = create_app(settings)  # the real engine settles in-process
    try:
        first = http.post(f"{url}/webhook", params={"token": TOKEN}, json=body("realsettle"))
        fired = redis_client.hgetall("smsbat:claims:{realsettle}")
        retry = http.post(f"{url}/webhook", params={"token": TOKEN}, json=body("realsettle"))
    finally:
        swappable.target = None
    assert first.status_code == 503
    assert fired == {}  # the claim was given back, not left pending for anyone to wait out
    assert retry.status_code == 200
    assert sent == ["refused", "smsbat_tracker.recipes.record_outcome"]
    kinds, served = kept(redis_client, "realsettle")
    assert kinds == {"outcome"}
    assert len(served) == 1


@pytest.mark.slow
def test_schemathesis_finds_nothing(settings: Settings, tracker_app: Any, tmp_path: Path) -> None:
    """schemathesis, with every check on, against the served receiver and the
    /openapi.json it serves (the token in the header, the campaign pages' login as Basic
    auth): no issue found."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    with_pages = settings.model_copy(update={"report_password": SecretStr("pages-pw")})
    with BackgroundServer(create_app(with_pages)) as server:
        proc = subprocess.run(
            [
                str(cli),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--header",
                f"{TOKEN_HEADER}: {TOKEN}",
                "--auth",
                "report:pages-pw",
                "--seed",
                "1",
            ],
            cwd=tmp_path,  # its example cache stays out of the checkout
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    assert "Failures:" not in proc.stdout
    # Its one warning, if any, is that no campaign id it made up exists (404s): the
    # fuzz cannot guess one.
    warnings = proc.stdout.partition("Warnings:")[2].partition("Test cases:")[0]
    assert warnings.count("⚠️") <= 1
    assert not warnings.strip() or "returned 404 responses" in warnings


def test_openapi_document(http: httpx.Client, hook: Hook) -> None:
    """/openapi.json is OpenAPI 3.1 describing the push body, the token and every answer."""
    document = http.get(f"{hook.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/webhook",
        "/healthz",
        "/campaigns/{campaign_id}",
        "/openapi.json",
    }
    post = document["paths"]["/webhook"]["post"]
    assert {(p["name"], p["in"]) for p in post["parameters"]} == {
        ("token", "query"),
        ("X-Webhook-Token", "header"),
    }
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"messageId", "deliverystatus", "timestamp"}
    assert {"200", "400", "401", "413", "415", "422"} <= set(post["responses"])
    assert set(document["paths"]["/healthz"]["get"]["responses"]) == {"200", "503"}
    page = document["paths"]["/campaigns/{campaign_id}"]["get"]
    assert page["security"] == [{"reportLogin": []}]
    assert document["components"]["securitySchemes"]["reportLogin"] == {
        "type": "http",
        "scheme": "basic",
    }
    assert {"200", "401", "404"} <= set(page["responses"])


# --------------------------------------------------------------------- fuzzing


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, so that the fuzz reaches the later checks and the store."""
    return st.sampled_from((True, True, True, False)).flatmap(lambda ok: good if ok else bad)


_CONTENT_TYPES = mostly(
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF8"]
    ),
    st.one_of(
        st.none(),
        st.sampled_from(
            [
                "application/json; charset=latin-1",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "",
            ]
        ),
        # h11 refuses header values with surrounding whitespace before they are sent
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip),
    ),
)
_TOKENS = st.sampled_from([("query", TOKEN)] * 4 + [("header", TOKEN), ("query", "x"), None])
_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_PUSH_FIELDS = st.fixed_dictionaries(
    {
        "messageId": mostly(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,20}", fullmatch=True), _JSON
        ),
        "deliverystatus": mostly(
            st.sampled_from(["scheduled", "processing", "delivered", "undeliverable", "odd"]),
            st.one_of(st.sampled_from(["", "x y", "é", "d" * 65]), _JSON),
        ),
        "timestamp": mostly(
            st.one_of(
                st.datetimes(timezones=_OFFSETS).map(datetime.isoformat),
                st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()[:-6] + "Z"),
            ),
            st.one_of(st.datetimes().map(datetime.isoformat), _JSON),
        ),
    },
    optional={"cost": mostly(st.floats(allow_nan=False, allow_infinity=False), _JSON)},
)
# A valid-looking push, maybe missing one required field, with random extra fields.
_NEAR_VALID = st.builds(
    lambda fields, extra, drop: {k: v for k, v in {**extra, **fields}.items() if k != drop},
    _PUSH_FIELDS,
    st.dictionaries(st.text(max_size=8), _JSON, max_size=3),
    mostly(st.none(), st.sampled_from(["messageId", "deliverystatus", "timestamp"])),
)
_BODIES = mostly(
    _NEAR_VALID.map(lambda v: json.dumps(v).encode()),
    st.one_of(st.binary(max_size=512), _JSON.map(lambda v: json.dumps(v).encode())),
)


@hypothesis_settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=_BODIES, content_type=_CONTENT_TYPES, token=_TOKENS)
def test_fuzz_never_5xx_and_rejects_store_nothing(
    http: httpx.Client,
    hook: Hook,
    redis_client: redis.Redis,
    content: bytes,
    content_type: str | None,
    token: tuple[str, str] | None,
) -> None:
    """Arbitrary bodies, media types and tokens: never a 5xx; a refusal stores nothing."""
    redis_client.flushdb()
    headers = {"Content-Type": content_type} if content_type is not None else {}
    params = {}
    if token is not None:
        where, value = token
        if where == "query":
            params["token"] = value
        else:
            headers["X-Webhook-Token"] = value
    response = http.post(hook.endpoint, params=params, headers=headers, content=content)
    assert response.status_code < 500, response.text
    event(f"HTTP {response.status_code}")
    if response.status_code == 200:
        answer = response.json()
        assert answer["status"] in ("stored", "ignored")
        message_id = json.loads(content)["messageId"]
        assert redis_client.exists(f"smsbat:status:{{{message_id}}}")
    else:
        assert status_keys(redis_client) == []


# --------------------------------------------------------------------- start-up


def _lifespan_messages(application: Any, *, shutdown: bool) -> tuple[list[Any], Any]:
    """Run the lifespan protocol; return what the app sent and what it raised (or None)."""

    async def run() -> tuple[list[Any], Any]:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await inbox.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        task = asyncio.create_task(application(scope, inbox.get, send))
        while not sent and not task.done():
            await asyncio.sleep(0.01)
        if sent and sent[0]["type"] == "lifespan.startup.complete":
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                sent.append((await client.get("/healthz")).json())
            if shutdown:
                await inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(task, 10)
        except Exception as exc:
            return sent, exc
        return sent, None

    return asyncio.run(run())


def test_lazy_app_reports_a_config_error_as_startup_failure() -> None:
    """A ConfigError at start-up becomes lifespan.startup.failed with one line, then raises."""

    def broken() -> Any:
        raise ConfigError("invalid settings: SMSBAT_WEBHOOK_TOKEN: required")

    sent, raised = _lifespan_messages(LazyWebhookApp(broken), shutdown=False)
    [failed] = sent
    assert failed["type"] == "lifespan.startup.failed"
    assert "SMSBAT_WEBHOOK_TOKEN" in failed["message"]
    assert "\n" not in failed["message"]
    assert isinstance(raised, ConfigError)


def test_lazy_app_without_lifespan_answers_503_on_a_config_error() -> None:
    """Served without lifespan, a configuration error answers 503 JSON, not a traceback."""

    def broken() -> Any:
        raise ConfigError("invalid settings: SMSBAT_WEBHOOK_TOKEN: required")

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=LazyWebhookApp(broken))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/webhook", json=body())

    response = asyncio.run(run())
    assert response.status_code == 503
    assert response.json() == {"error": "unavailable", "field": None}


def test_lazy_app_builds_at_startup_and_closes_at_shutdown(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """The lazy app builds at start-up, serves, and its own engine is closed at shutdown."""
    built: list[Any] = []

    def factory() -> Any:
        application = create_app(make_settings(webhook_token=TOKEN), settle=lambda _mid: None)
        built.append(application)
        return application

    sent, raised = _lifespan_messages(LazyWebhookApp(factory), shutdown=True)
    assert raised is None
    assert [m if isinstance(m, dict) and "type" not in m else m["type"] for m in sent] == [
        "lifespan.startup.complete",
        {"status": "ok"},
        "lifespan.shutdown.complete",
    ]
    [application] = built
    assert application.state.receiver._own_engine is None  # closed


def test_served_without_a_token_exits_with_one_clear_line(tmp_path: Any) -> None:
    """uvicorn smsbat_tracker.webhook:app and python -m smsbat_tracker.webhook both stop at
    start-up naming SMSBAT_WEBHOOK_TOKEN, without a traceback (exit 3 and 2)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBAT_WEBHOOK")}
    env["SMSBAT_API_KEY"] = "sandbox-key"
    commands = [
        [sys.executable, "-m", "uvicorn", "smsbat_tracker.webhook:app", "--port", "0"],
        [sys.executable, "-m", "smsbat_tracker.webhook", "--port", "0"],
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in commands
    ]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    (uv_out, uv_err), uv_code = results[0]
    (main_out, main_err), main_code = results[1]
    assert uv_code == 3
    assert "Traceback" not in uv_err + uv_out
    [line] = [x for x in uv_err.splitlines() if "SMSBAT_WEBHOOK_TOKEN" in x]
    assert "smsbat-tracker webhook: invalid settings" in line
    assert "Application startup failed" in uv_err
    assert main_code == 2
    assert main_out == ""
    assert main_err.count("\n") == 1
    assert main_err.startswith("smsbat-tracker webhook: invalid settings: SMSBAT_WEBHOOK_TOKEN")


def test_pushed_message_is_not_polled_until_the_deadline(
    http: httpx.Client,
    live_hook: Hook,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    """Once a push arrived for a message, its tracker waits for pushes: one check, at the end."""
    mid = sandbox.state.create_scripted([("processing", 0)])
    assert push(http, live_hook, body(mid, status="processing")).json() == {
        "status": "stored",
        "final": False,
    }
    sent_at = time.time()
    track_message.delay(mid, deadline=5, on_timeout=record_outcome.s(label="tp"))
    [result] = wait_for(lambda: outcomes(redis_client, "tp"), timeout=15)
    assert result["outcome"] == "timeout"
    times = sandbox.state.truth(mid)["poll_times"]
    assert len(times) == 1  # the safety-net check at the deadline, nothing before
    assert times[0] >= sent_at + 5 - 0.5


def test_push_before_the_first_check_ends_tracking_at_once(
    http: httpx.Client,
    live_hook: Hook,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    """The enqueue registers the tracking: a final push before the first check fires at once."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    track_message.delay(mid, on_delivered=record_outcome.s(label="early"))
    pushed_at = time.time()
    assert push(http, live_hook, body(mid)).json() == {"status": "stored", "final": True}
    [entry] = wait_for(lambda: recorded(redis_client, "early"))
    assert entry["recorded_at"] - pushed_at < settings.first_delay  # not at the first run
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["polls"] == 0
    # The first run (a countdown held unacked by the worker) has run and found it ended.
    wait_for(lambda: redis_client.llen("celery") + redis_client.hlen("unacked") == 0)
    assert sandbox.state.truth(mid)["polls"] == 0


# --------------------------------------------------------------------- start-up and load


def test_start_up_connects_before_the_first_push(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Served with its lifespan, the receiver's own engine is built before any request."""
    application = create_app(make_settings(webhook_token=TOKEN), settle=lambda _mid: None)
    receiver = application.state.receiver
    assert receiver._own_engine is None
    with BackgroundServer(application, lifespan="on"):
        assert receiver._own_engine is not None
    assert receiver._own_engine is None  # closed at shutdown


def test_start_up_warms_the_celery_apps_engine(settings: Settings, tracker_app: Any) -> None:
    """With the Celery app's settings, start-up warms that app: engine and producer."""
    tracker_app.close_engine()
    with BackgroundServer(create_app(settings), lifespan="on"):
        assert tracker_app.tracker._engine is not None


def test_start_up_with_redis_down_still_serves(
    http: httpx.Client, make_settings: Callable[..., Settings]
) -> None:
    """An unreachable Redis at start-up is logged by exception name; pushes then answer 503."""
    dead = make_settings(webhook_token=TOKEN, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    application = create_app(dead, settle=lambda _mid: None)
    with capture_logs() as logs, BackgroundServer(application, lifespan="on") as server:
        pushed = http.post(f"{server.url}/webhook", params={"token": TOKEN}, json=body("w1"))
    assert pushed.status_code == 503
    [failed] = [e for e in logs if e["event"] == "webhook.warm_failed"]
    assert failed["error"] == "ConnectionError"


def test_a_burst_is_applied_a_few_pushes_at_a_time(
    settings: Settings, tracker_app: Any, shared_server: tuple[str, Swappable]
) -> None:
    """At most APPLY_THREADS pushes are stored at once; the others wait their turn, then pass."""
    url, swappable = shared_server
    release = threading.Event()
    lock = threading.Lock()
    inside = [0]
    most = [0]

    def slow_settle(_message_id: str) -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(10)
        with lock:
            inside[0] -= 1

    swappable.target = create_app(settings, settle=slow_settle)
    burst = APPLY_THREADS * 2
    try:
        with httpx.Client(timeout=15.0) as client, ThreadPoolExecutor(burst) as pool:
            answers = [
                pool.submit(
                    client.post, f"{url}/webhook", params={"token": TOKEN}, json=body(f"b{i}")
                )
                for i in range(burst)
            ]
            wait_for(lambda: inside[0] == APPLY_THREADS)
            with pytest.raises(AssertionError):  # nobody else gets in while they are busy
                wait_for(lambda: inside[0] > APPLY_THREADS, timeout=0.5)
            release.set()
            codes = [answer.result().status_code for answer in answers]
    finally:
        release.set()
        swappable.target = None
    assert codes == [200] * burst
    assert most[0] == APPLY_THREADS


def test_a_final_push_waiting_for_a_slot_goes_before_earlier_others(
    settings: Settings, tracker_app: Any, shared_server: tuple[str, Swappable]
) -> None:
    """With every slot busy, a final push that came after two "processing" ones gets the next."""
    url, swappable = shared_server
    release: defaultdict[str, threading.Event] = defaultdict(threading.Event)
    settling: list[str] = []

    def slow_settle(message_id: str) -> None:
        settling.append(message_id)
        release[message_id].wait(10)

    application = create_app(settings, settle=slow_settle)
    slots: ApplySlots = application.state.receiver.apply_slots
    swappable.target = application
    try:
        with httpx.Client(timeout=15.0) as client, ThreadPoolExecutor(8) as pool:

            def send(message_id: str, status: str) -> Any:
                return pool.submit(
                    client.post,
                    f"{url}/webhook",
                    params={"token": TOKEN},
                    json=body(message_id, status),
                )

            answers = [send(f"busy{i}", "delivered") for i in range(APPLY_THREADS)]
            wait_for(lambda: len(settling) == APPLY_THREADS)
            answers += [send("early1", "processing"), send("early2", "processing")]
            wait_for(lambda: slots.waiting == (0, 2))
            answers.append(send("late", "undeliverable"))
            wait_for(lambda: slots.waiting == (1, 2))
            release["busy0"].set()  # one slot comes free
            wait_for(lambda: "late" in settling)
            assert slots.waiting == (0, 2)  # the earlier non-final pushes still wait
            for event in list(release.values()):
                event.set()
            codes = [answer.result().status_code for answer in answers]
    finally:
        for event in release.values():
            event.set()
        swappable.target = None
    assert codes == [200] * len(codes)
    assert slots.waiting == (0, 0)


def _run_slots(scenario: Callable[[ApplySlots, list[str]], Any]) -> list[str]:
    entered: list[str] = []
    anyio.run(scenario, ApplySlots(1), entered)
    return entered


async def _hold(slots: ApplySlots, entered: list[str], name: str, final: bool) -> None:
    async with slots.slot(final=final):
        entered.append(name)
        await anyio.sleep(0)


def test_the_apply_slots_serve_final_pushes_first_and_each_kind_in_order() -> None:
    """Waiting finals take freed slots before waiting others; within a kind, first come first."""

    async def scenario(slots: ApplySlots, entered: list[str]) -> None:
        async with anyio.create_task_group() as tasks, slots.slot(final=False):
            for name, final in [("o1", False), ("f1", True), ("o2", False), ("f2", True)]:
                tasks.start_soon(_hold, slots, entered, name, final)
            await wait_until(lambda: slots.waiting == (2, 2))

    assert _run_slots(scenario) == ["f1", "f2", "o1", "o2"]


def test_a_cancelled_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    """A push cancelled while waiting (its client went away) is skipped; the slot still frees."""

    async def scenario(slots: ApplySlots, entered: list[str]) -> None:
        async with anyio.create_task_group() as tasks, slots.slot(final=False):
            gone = anyio.CancelScope()
            tasks.start_soon(_cancellable, slots, entered, gone)
            await wait_until(lambda: slots.waiting == (1, 0))
            gone.cancel()
            await wait_until(lambda: slots.waiting == (0, 0))
        async with slots.slot(final=False):  # the one slot is back
            entered.append("after")

    assert _run_slots(scenario) == ["after"]


def test_a_waiter_cancelled_after_being_handed_the_slot_passes_it_on() -> None:
    """Cancelled between being handed a slot and taking it, a push gives it to the next.

    asyncio's own ``Task.cancel`` (anyio's scopes wait for the next checkpoint instead).
    """

    async def scenario(slots: ApplySlots, entered: list[str]) -> None:
        async with slots.slot(final=False):
            handed = asyncio.create_task(_hold(slots, entered, "handed", True))
            await wait_until(lambda: slots.waiting == (1, 0))
            following = asyncio.create_task(_hold(slots, entered, "next", False))
            await wait_until(lambda: slots.waiting == (1, 1))
        # The slot went to the final push, which is cancelled before it runs again.
        handed.cancel()
        await asyncio.gather(handed, following, return_exceptions=True)
        assert handed.cancelled()
        async with slots.slot(final=True):  # and the slot came back in the end
            entered.append("after")

    assert _run_slots(scenario) == ["next", "after"]


async def _cancellable(slots: ApplySlots, entered: list[str], scope: anyio.CancelScope) -> None:
    with scope:
        async with slots.slot(final=True):
            entered.append("cancelled")  # never: the scope is cancelled before it gets in


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0)
