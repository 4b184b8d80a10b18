"""Tests of the simulated SMSBAT API (smsbat_tracker.tools.sandbox) over real HTTP."""

import asyncio
import base64
import json
import math
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from smsbat_tracker.tools.sandbox import (
    SandboxConfig,
    SandboxServer,
    SandboxState,
    create_app,
    main,
)
from smsbat_tracker.tools.serving import BackgroundServer

KEY = "test-key"
USER = "tester"
PASSWORD = "test-password"
HEADER_AUTH = {"X-Authorization-Key": KEY}


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


def poll_status(client: httpx.Client, message_id: str) -> dict[str, Any]:
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def wait_status(client: httpx.Client, message_id: str, status: str) -> dict[str, Any]:
    """Poll the API until ``message_id`` reports ``status``; return that body."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(poll_status(client, message_id))
        return bool(seen["deliverystatus"] == status)

    wait_for(reached)
    return seen


def push_count(sandbox: SandboxServer, message_id: str) -> int:
    """Number of webhook pushes the sandbox has recorded for ``message_id``."""
    pushes = sandbox.state.truth(message_id)["pushes"]
    assert isinstance(pushes, list)
    return len(pushes)


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    config = SandboxConfig(api_key=KEY, username=USER, password=PASSWORD, seed=7)
    with SandboxServer(config) as running:
        yield running


@pytest.fixture
def client(server: SandboxServer) -> Iterator[httpx.Client]:
    server.state.reset()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        yield http


class PushReceiver:
    """A raw ASGI app recording the JSON bodies POSTed to it; answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.status = 200
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        with self._lock:
            self.bodies.append(json.loads(b"".join(chunks)))
            self.paths.append(f"{scope['path']}?{scope['query_string'].decode()}")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.bodies)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[PushReceiver, str]]:
    app = PushReceiver()
    with BackgroundServer(app) as running:
        yield app, running.url


@pytest.fixture(scope="module")
def push_server(receiver: tuple[PushReceiver, str]) -> Iterator[SandboxServer]:
    config = SandboxConfig(
        api_key=KEY,
        push_url=f"{receiver[1]}/hook?token=t0k",
        # Sent messages settle within a fraction of a second, always delivered.
        processing_after=0.05,
        median_final=0.1,
        p95_final=0.15,
        undeliverable_rate=0.0,
        never_final_rate=0.0,
    )
    with SandboxServer(config) as running:
        yield running


# ----------------------------------------------------------------------- auth


def test_header_auth_accepted_and_counted(server: SandboxServer, client: httpx.Client) -> None:
    """X-Authorization-Key with the API key is accepted and counted as "header"."""
    message_id = server.state.create_scripted([("delivered", 0)])
    assert client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH).status_code == 200
    assert server.state.stats()["auth"] == {"header": 1, "basic": 0, "basic-key": 0}


def test_basic_auth_accepted_and_counted(server: SandboxServer, client: httpx.Client) -> None:
    """HTTP Basic with the dashboard login and password is accepted and counted as "basic"."""
    message_id = server.state.create_scripted([("delivered", 0)])
    response = client.get(f"/bat/message/{message_id}", auth=(USER, PASSWORD))
    assert response.status_code == 200
    assert server.state.stats()["auth"] == {"header": 0, "basic": 1, "basic-key": 0}


def test_basic_key_auth_accepted_and_counted(server: SandboxServer, client: httpx.Client) -> None:
    """HTTP Basic with user "@" and the API key is accepted and counted as "basic-key"."""
    message_id = server.state.create_scripted([("delivered", 0)])
    response = client.get(f"/bat/message/{message_id}", auth=("@", KEY))
    assert response.status_code == 200
    assert server.state.stats()["auth"] == {"header": 0, "basic": 0, "basic-key": 1}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Authorization-Key": "wrong"},
        {"X-Authorization-Key": ""},
        {"Authorization": "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()},
        {"Authorization": "Basic " + base64.b64encode(b"@:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(f"@:{PASSWORD}".encode()).decode()},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": f"Bearer {KEY}"},
    ],
    ids=["none", "bad-key", "empty-key", "bad-pass", "bad-basic-key", "@-pass", "junk", "bearer"],
)
def test_bad_or_missing_auth_is_401(
    server: SandboxServer, client: httpx.Client, headers: dict[str, str]
) -> None:
    """Missing or wrong credentials get 401 {"error": "unauthorized"} and no poll is recorded."""
    message_id = server.state.create_scripted([("delivered", 0)])
    response = client.get(f"/bat/message/{message_id}", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert response.headers["content-type"] == "application/json"
    assert server.state.truth(message_id)["polls"] == 0
    stats = server.state.stats()
    assert stats["responses"] == {"401": 1}
    assert stats["auth"] == {"header": 0, "basic": 0, "basic-key": 0}


def test_send_requires_auth(client: httpx.Client) -> None:
    """POST /bat/messagelist without credentials is refused with 401."""
    response = client.post("/bat/messagelist", json={"messages": []})
    assert response.status_code == 401


# ------------------------------------------------------------------ lifecycle


def test_scripted_lifecycle(server: SandboxServer, client: httpx.Client) -> None:
    """A scripted message goes scheduled -> processing -> delivered on its timeline."""
    message_id = server.state.create_scripted(
        [("processing", 0.15), ("delivered", 0.3)], cost=0.1, partscount=2
    )
    assert poll_status(client, message_id)["deliverystatus"] == "scheduled"
    processing = wait_status(client, message_id, "processing")
    assert processing["cost"] == 0.0
    delivered = wait_status(client, message_id, "delivered")
    assert delivered == {
        "messagelistId": delivered["messagelistId"],
        "messageId": message_id,
        "deliverystatus": "delivered",
        "partscount": 2,
        "cost": 0.1,
    }
    assert isinstance(delivered["messagelistId"], int)


def test_scheduled_body_omits_fields(server: SandboxServer, client: httpx.Client) -> None:
    """While scheduled, the body is only deliverystatus and partscount, as the real API does."""
    message_id = server.state.create_scripted([("scheduled", 0), ("delivered", 60)], partscount=3)
    assert poll_status(client, message_id) == {"deliverystatus": "scheduled", "partscount": 3}


def test_failure_costs_nothing(server: SandboxServer, client: httpx.Client) -> None:
    """A message that ends undeliverable reports cost 0.0 whatever its scripted cost."""
    message_id = server.state.create_scripted([("undeliverable", 0)], cost=0.2)
    body = poll_status(client, message_id)
    assert body["deliverystatus"] == "undeliverable"
    assert body["cost"] == 0.0


def test_unknown_status_served_as_is(server: SandboxServer, client: httpx.Client) -> None:
    """An unknown status string is served verbatim and is not final in the truth."""
    message_id = server.state.create_scripted([("queued_at_carrier", 0)])
    body = poll_status(client, message_id)
    assert body["deliverystatus"] == "queued_at_carrier"
    assert body["messageId"] == message_id
    truth = server.state.truth(message_id)
    assert truth["final_status"] is None
    assert truth["final_at"] is None


def test_unknown_message_is_404(client: httpx.Client) -> None:
    """An unknown message id answers 404 {"error": "message not found"}."""
    response = client.get("/bat/message/ffffffffffffffffffffffff", headers=HEADER_AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "message not found"}


def test_extended_body_normal(server: SandboxServer, client: httpx.Client) -> None:
    """An extended message carries the fallback-chain fields; sms is "not_used" without fallback."""
    message_id = server.state.create_scripted([("delivered", 0)], cost=0.03, extended={})
    body = poll_status(client, message_id)
    assert body["deliverystatus"] == "delivered"
    assert body["fallbacks"] == [{"type": "sms", "status": "not_used"}]
    assert body["extendedStatuses"] == {"viber": "delivered", "sms": "not_used"}
    assert body["rate"] == body["rateAmount"] == 0.03
    assert body["billAmount"] == 0.03
    assert body["rateCurrency"] == body["billCurrency"] == "USD"


def test_extended_body_fallback(server: SandboxServer, client: httpx.Client) -> None:
    """A fallback delivery shows viber undeliverable and sms delivered, including fallbacks[0]."""
    message_id = server.state.create_scripted(
        [("processing", 0), ("delivered", 0.2)], extended={"fallback": True, "extra": 1}
    )
    processing = poll_status(client, message_id)
    assert processing["extendedStatuses"] == {"viber": "processing", "sms": "not_used"}
    assert processing["billAmount"] == 0.0
    body = wait_status(client, message_id, "delivered")
    assert body["fallbacks"] == [{"type": "sms", "status": "delivered"}]
    assert body["extendedStatuses"] == {"viber": "undeliverable", "sms": "delivered"}
    assert body["extra"] == 1
    assert "fallback" not in body
    assert server.state.truth(message_id)["fallback"] is True


def test_poll_times_recorded(server: SandboxServer, client: httpx.Client) -> None:
    """Every authenticated GET is recorded with its arrival time, in order."""
    message_id = server.state.create_scripted([("processing", 0)])
    before = time.time()
    for _ in range(3):
        poll_status(client, message_id)
    truth = server.state.truth(message_id)
    assert truth["polls"] == 3
    times = truth["poll_times"]
    assert isinstance(times, list)
    assert times == sorted(times)
    assert before <= times[0] <= times[-1] <= time.time()


# ----------------------------------------------------------------------- send


def test_send_accepts_and_rejects(server: SandboxServer, client: httpx.Client) -> None:
    """Valid messages are accepted with a 24-hex id; bad numbers and types are rejected."""
    payload = {
        "messages": [
            {"from": "Shop", "to": "+380501234567", "type": "sms", "text": "hi"},
            {
                "from": "Shop",
                "to": "+380501234568",
                "type": "viber_promo",
                "text": "x",
                "customerMessageId": "c-2",
            },
            {"from": "Shop", "to": "0501234567", "type": "sms", "text": "hi"},
            {"from": "Shop", "to": "+380501234567", "type": "fax", "text": "hi"},
            {"from": "Shop", "to": "+0123456789", "type": "sms", "text": "hi"},
            {"from": "Shop", "to": "+380501234567\n", "type": "sms", "text": "hi"},
            "not an object",
        ]
    }
    response = client.post("/bat/messagelist", json=payload, headers=HEADER_AUTH)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["messagelistId"], int)
    results = body["messages"]
    assert [r["status"] for r in results] == [
        "accepted",
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]
    for accepted in results[:2]:
        assert re.fullmatch(r"[0-9a-f]{24}", accepted["messageId"])
        assert accepted["parts"] == 1
    assert results[1]["customerMessageId"] == "c-2"
    assert results[1]["to"] == "+380501234568"
    assert all(r["messageId"] is None for r in results[2:])
    # The accepted messages exist and answer the status endpoint.
    sms = poll_status(client, results[0]["messageId"])
    assert sms["deliverystatus"] in {"scheduled", "processing"}
    viber_truth = server.state.truth(results[1]["messageId"])
    assert viber_truth["messagelistId"] == body["messagelistId"]
    stats = server.state.stats()
    assert stats["send_requests"] == 1


@pytest.mark.parametrize(
    ("length", "parts"), [(0, 1), (1, 1), (160, 1), (161, 2), (306, 2), (307, 3)]
)
def test_send_parts(client: httpx.Client, length: int, parts: int) -> None:
    """Parts are 1 up to 160 characters, then ceil(len / 153)."""
    message = {"from": "S", "to": "+380501234567", "type": "sms", "text": "a" * length}
    response = client.post("/bat/messagelist", json={"messages": [message]}, auth=("@", KEY))
    assert response.json()["messages"][0]["parts"] == parts


@pytest.mark.parametrize(
    "content", [b"not json", b"[]", b'{"messages": {}}', b"{}"], ids=["junk", "list", "obj", "none"]
)
def test_send_bad_body_is_400(client: httpx.Client, content: bytes) -> None:
    """A body that is not JSON or lacks a "messages" list answers 400 with an error."""
    response = client.post("/bat/messagelist", content=content, headers=HEADER_AUTH)
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str)


def test_send_outcome_mix_follows_config() -> None:
    """Sent messages' outcomes and final times follow the configured mix and log-normal times."""
    config = SandboxConfig(
        seed=3,
        median_final=4.0,
        p95_final=40.0,
        undeliverable_rate=0.2,
        permanenterror_rate=0.1,
        never_final_rate=0.1,
        fallback_rate=0.3,
    )
    count = 4000
    messages = [
        {"from": "S", "to": "+380501234567", "type": "viber_trans", "text": "t"}
        for _ in range(count)
    ]
    with SandboxServer(config) as sandbox, httpx.Client(base_url=sandbox.url) as http:
        response = http.post(
            "/bat/messagelist",
            json={"messages": messages},
            headers={"X-Authorization-Key": config.api_key},
        )
        assert response.status_code == 200
        truths = http.get("/sandbox/messages").json()["messages"]
    assert len(truths) == count
    finals = [t["final_status"] for t in truths]
    assert finals.count("undeliverable") / count == pytest.approx(0.2, abs=0.03)
    assert finals.count("permanenterror") / count == pytest.approx(0.1, abs=0.03)
    assert finals.count(None) / count == pytest.approx(0.1, abs=0.03)
    fallbacks = sum(1 for t in truths if t["fallback"])
    assert fallbacks / count == pytest.approx(0.3, abs=0.03)
    assert all(t["final_status"] == "delivered" for t in truths if t["fallback"])
    delays = [t["final_at"] - t["created_at"] for t in truths if t["final_at"] is not None]
    assert statistics.median(delays) == pytest.approx(4.0, rel=0.15)
    p95 = sorted(delays)[int(len(delays) * 0.95)]
    assert p95 == pytest.approx(40.0, rel=0.25)
    for truth in truths:
        statuses = [status for status, _ in truth["timeline"]]
        assert statuses[:2] == ["scheduled", "processing"]
        assert truth["timeline"][1][1] <= truth["timeline"][-1][1]


def test_seed_makes_outcomes_reproducible() -> None:
    """Two sandboxes with the same seed plan the same outcomes and delays (in-process ASGI)."""

    async def plan() -> list[tuple[object, object]]:
        app = create_app(SandboxConfig(seed=11))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as http:
            message = {"from": "S", "to": "+380501234567", "type": "sms", "text": "t"}
            response = await http.post(
                "/bat/messagelist",
                json={"messages": [message] * 50},
                headers={"X-Authorization-Key": "sandbox-key"},
            )
            assert response.status_code == 200
        plans: list[tuple[object, object]] = []
        for truth in app.state.all_truths():
            final_at, created_at = truth["final_at"], truth["created_at"]
            assert isinstance(created_at, float)
            delay = final_at - created_at if isinstance(final_at, float) else None
            plans.append((truth["final_status"], delay))
        return plans

    first = asyncio.run(plan())
    second = asyncio.run(plan())
    assert [status for status, _ in first] == [status for status, _ in second]
    for (_, a), (_, b) in zip(first, second, strict=True):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6)


# --------------------------------------------------------------------- faults


def test_fault_500(server: SandboxServer, client: httpx.Client) -> None:
    """A queued "500" fault answers 500 {"error": "internal"} once, then normally."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["500"]})
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "internal"}
    assert poll_status(client, message_id)["deliverystatus"] == "delivered"
    assert server.state.truth(message_id)["polls"] == 2


def test_fault_429_retry_after(server: SandboxServer, client: httpx.Client) -> None:
    """A "429" fault answers 429 with Retry-After = ceil(retry_after) seconds."""
    message_id = server.state.create_scripted([("delivered", 0)])
    response = client.post(
        "/sandbox/faults", json={"retry_after": 2.2, "message_faults": {message_id: ["429"]}}
    )
    assert response.status_code == 200
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"


def test_fault_429_default_retry_after(server: SandboxServer, client: httpx.Client) -> None:
    """Without a retry_after setting, a 429 fault sends Retry-After: 1."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["429"]})
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


def test_fault_malformed(server: SandboxServer, client: httpx.Client) -> None:
    """A "malformed" fault answers 200 with a body that is not valid JSON."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["malformed"]})
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_fault_truncated(server: SandboxServer, client: httpx.Client) -> None:
    """A "truncated" fault announces a longer Content-Length than it sends, then closes."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["truncated"]})
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert poll_status(client, message_id)["deliverystatus"] == "delivered"
    assert server.state.truth(message_id)["polls"] == 2


def test_fault_slow(server: SandboxServer, client: httpx.Client) -> None:
    """A "slow" fault delays the answer by slow_seconds without blocking other requests."""
    slow_id = server.state.create_scripted([("delivered", 0)])
    fast_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(slow_seconds=0.4, message_faults={slow_id: ["slow"]})
    results: dict[str, float] = {}

    def slow_get() -> None:
        with httpx.Client(base_url=client.base_url) as other:
            start = time.monotonic()
            assert other.get(f"/bat/message/{slow_id}", headers=HEADER_AUTH).status_code == 200
            results["slow"] = time.monotonic() - start

    thread = threading.Thread(target=slow_get)
    thread.start()
    wait_for(lambda: server.state.truth(slow_id)["polls"] == 1)
    start = time.monotonic()
    poll_status(client, fast_id)
    results["fast"] = time.monotonic() - start
    thread.join(5)
    assert results["slow"] >= 0.4
    assert results["fast"] < 0.3


def test_fault_401(server: SandboxServer, client: httpx.Client) -> None:
    """A "401" fault refuses valid credentials once; the poll still counts."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["401"]})
    response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert server.state.truth(message_id)["polls"] == 1


def test_fault_queue_in_order(server: SandboxServer, client: httpx.Client) -> None:
    """A message's fault queue is consumed in order by its next GETs only."""
    message_id = server.state.create_scripted([("delivered", 0)])
    other_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(message_faults={message_id: ["500", "429", "401"]})
    assert client.get(f"/bat/message/{other_id}", headers=HEADER_AUTH).status_code == 200
    codes = [
        client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH).status_code for _ in range(4)
    ]
    assert codes == [500, 429, 401, 200]


@pytest.mark.parametrize(
    ("setting", "code"),
    [("error_rate", 500), ("rate_limit_rate", 429), ("malformed_rate", 200)],
)
def test_random_faults(
    server: SandboxServer, client: httpx.Client, setting: str, code: int
) -> None:
    """Random fault rates apply to status GETs only; rate 1.0 faults every GET."""
    message_id = server.state.create_scripted([("delivered", 0)])
    assert client.post("/sandbox/faults", json={setting: 1.0}).status_code == 200
    for _ in range(3):
        response = client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
        assert response.status_code == code
        if setting == "malformed_rate":
            with pytest.raises(json.JSONDecodeError):
                response.json()
    message = {"from": "S", "to": "+380501234567", "type": "sms", "text": "t"}
    send = client.post("/bat/messagelist", json={"messages": [message]}, headers=HEADER_AUTH)
    assert send.status_code == 200
    assert server.state.truth(message_id)["polls"] == 3


def test_random_slow_fault(server: SandboxServer, client: httpx.Client) -> None:
    """slow_rate 1.0 delays every status GET by slow_seconds."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(slow_rate=1.0, slow_seconds=0.2)
    start = time.monotonic()
    assert poll_status(client, message_id)["deliverystatus"] == "delivered"
    assert time.monotonic() - start >= 0.2


@pytest.mark.parametrize(
    "body",
    [
        {"error_rate": 1.5},
        {"error_rate": 0.6, "rate_limit_rate": 0.6},
        {"slow_seconds": -1},
        {"message_faults": {"x": ["boom"]}},
        {"message_faults": ["500"]},
    ],
)
def test_bad_fault_settings_are_400(client: httpx.Client, body: dict[str, object]) -> None:
    """Invalid fault settings answer 400 and change nothing."""
    assert client.post("/sandbox/faults", json=body).status_code == 400


def test_reset_clears_faults_messages_and_counters(
    server: SandboxServer, client: httpx.Client
) -> None:
    """POST /sandbox/reset forgets messages, faults and counters."""
    message_id = server.state.create_scripted([("delivered", 0)])
    server.state.set_faults(error_rate=1.0, message_faults={message_id: ["429"]})
    assert client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH).status_code == 429
    assert client.post("/sandbox/reset").status_code == 200
    stats = client.get("/sandbox/stats").json()
    assert stats["requests"] == 0
    assert stats["messages"] == 0
    assert client.get(f"/bat/message/{message_id}", headers=HEADER_AUTH).status_code == 404
    again = server.state.create_scripted([("delivered", 0)])
    assert client.get(f"/bat/message/{again}", headers=HEADER_AUTH).status_code == 200


# ---------------------------------------------------------------------- admin


def test_truth_endpoint(server: SandboxServer, client: httpx.Client) -> None:
    """GET /sandbox/messages/{id} reports final_status, final_at and the polls made."""
    before = time.time()
    message_id = server.state.create_scripted([("processing", 0), ("undeliverable", 0.2)])
    poll_status(client, message_id)
    poll_status(client, message_id)
    truth = client.get(f"/sandbox/messages/{message_id}").json()
    assert truth["messageId"] == message_id
    assert truth["final_status"] == "undeliverable"
    assert truth["final_at"] == pytest.approx(truth["created_at"] + 0.2)
    assert before <= truth["created_at"] <= time.time()
    assert truth["polls"] == 2
    assert len(truth["poll_times"]) == 2
    assert truth["pushes"] == []
    never = server.state.create_scripted([("processing", 0)])
    assert client.get(f"/sandbox/messages/{never}").json()["final_status"] is None
    assert client.get("/sandbox/messages/nope").status_code == 404


def test_all_truths_endpoint(server: SandboxServer, client: httpx.Client) -> None:
    """GET /sandbox/messages lists the truth of every message."""
    ids = {server.state.create_scripted([("delivered", 0)]) for _ in range(3)}
    truths = client.get("/sandbox/messages").json()["messages"]
    assert {t["messageId"] for t in truths} == ids


def test_admin_create_scripted(client: httpx.Client) -> None:
    """POST /sandbox/messages creates scripted messages, with or without a chosen id."""
    payload = {
        "messages": [
            {"messageId": "my-id-1", "timeline": [["processing", 0], ["delivered", 0.1]]},
            {"timeline": [["delivered", 0]], "cost": 0.2, "partscount": 2, "extended": {}},
        ]
    }
    response = client.post("/sandbox/messages", json=payload)
    assert response.status_code == 200
    first, second = response.json()["messageIds"]
    assert first == "my-id-1"
    assert re.fullmatch(r"[0-9a-f]{24}", second)
    body = poll_status(client, second)
    assert body["cost"] == 0.2
    assert body["partscount"] == 2
    assert "extendedStatuses" in body
    assert wait_status(client, first, "delivered")["messageId"] == "my-id-1"


@pytest.mark.parametrize(
    "item",
    [
        {},
        {"timeline": []},
        {"timeline": [["delivered"]]},
        {"timeline": [["processing", 1], ["delivered", 0.5]]},
        {"timeline": [["delivered", -1]]},
        {"timeline": [["", 0]]},
        {"timeline": [["delivered", 0]], "partscount": 0},
        {"timeline": [["delivered", 0]], "extended": []},
    ],
)
def test_admin_create_scripted_rejects_bad_input(
    client: httpx.Client, item: dict[str, object]
) -> None:
    """Invalid scripted messages answer 400 and create nothing."""
    response = client.post("/sandbox/messages", json={"messages": [item]})
    assert response.status_code == 400
    assert client.get("/sandbox/messages").json() == {"messages": []}


def test_duplicate_scripted_id_rejected(server: SandboxServer) -> None:
    """create_scripted refuses an id that already exists."""
    server.state.reset()
    server.state.create_scripted([("delivered", 0)], message_id="dup")
    with pytest.raises(ValueError, match="already exists"):
        server.state.create_scripted([("delivered", 0)], message_id="dup")


def test_stats_endpoint(server: SandboxServer, client: httpx.Client) -> None:
    """GET /sandbox/stats counts /bat/ requests by route, auth method and response code."""
    message_id = server.state.create_scripted([("delivered", 0)])
    poll_status(client, message_id)
    client.get(f"/bat/message/{message_id}", auth=(USER, PASSWORD))
    client.get("/bat/message/unknown", auth=("@", KEY))
    client.get(f"/bat/message/{message_id}")
    client.post("/bat/messagelist", json={"messages": []}, headers=HEADER_AUTH)
    assert client.get("/sandbox/stats").json() == {
        "requests": 5,
        "status_requests": 4,
        "send_requests": 1,
        "admin_requests": 1,
        "messages": 1,
        "auth": {"header": 2, "basic": 1, "basic-key": 1},
        "responses": {"200": 3, "401": 1, "404": 1},
    }


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/", 404),
        ("GET", "/bat/unknown", 404),
        ("GET", "/sandbox/unknown", 404),
        ("POST", "/bat/message/abc", 405),
        ("GET", "/bat/messagelist", 405),
        ("DELETE", "/sandbox/messages", 405),
        ("GET", "/sandbox/reset", 405),
        ("GET", "/sandbox/faults", 405),
        ("POST", "/sandbox/stats", 405),
        ("PUT", "/sandbox/messages/abc", 405),
    ],
)
def test_unknown_paths_and_wrong_methods(
    client: httpx.Client, method: str, path: str, code: int
) -> None:
    """Unknown paths answer 404 and wrong methods 405, always as JSON."""
    response = client.request(method, path, headers=HEADER_AUTH)
    assert response.status_code == code
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


# ----------------------------------------------------------------------- push


def test_push_on_each_status_change(
    push_server: SandboxServer, receiver: tuple[PushReceiver, str]
) -> None:
    """Each status change is POSTed to push_url with messageId, status, timestamp and cost."""
    app, _ = receiver
    start = len(app.received())
    message_id = push_server.state.create_scripted(
        [("processing", 0.05), ("delivered", 0.15)], cost=0.07
    )
    wait_for(lambda: push_count(push_server, message_id) == 2)
    bodies = [b for b in app.received()[start:] if b["messageId"] == message_id]
    assert [b["deliverystatus"] for b in bodies] == ["processing", "delivered"]
    assert [b["cost"] for b in bodies] == [0.0, 0.07]
    for body in bodies:
        assert set(body) == {"messageId", "deliverystatus", "timestamp", "cost"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["timestamp"])
    assert app.paths[-1] == "/hook?token=t0k"
    pushes = push_server.state.truth(message_id)["pushes"]
    assert isinstance(pushes, list)
    assert [p["http_status"] for p in pushes] == [200, 200]
    assert [p["deliverystatus"] for p in pushes] == ["processing", "delivered"]
    assert all(isinstance(p["sent_at"], float) for p in pushes)


def test_push_for_sent_messages(
    push_server: SandboxServer, receiver: tuple[PushReceiver, str]
) -> None:
    """Messages sent through POST /bat/messagelist are pushed too (status changes only)."""
    app, _ = receiver
    message = {"from": "S", "to": "+380501234567", "type": "sms", "text": "t"}
    with httpx.Client(base_url=push_server.url) as http:
        response = http.post("/bat/messagelist", json={"messages": [message]}, headers=HEADER_AUTH)
        message_id = response.json()["messages"][0]["messageId"]
    wait_for(lambda: push_count(push_server, message_id) == 2)
    statuses = [b["deliverystatus"] for b in app.received() if b["messageId"] == message_id]
    assert statuses == ["processing", "delivered"]


def test_push_skipped_without_change(
    push_server: SandboxServer, receiver: tuple[PushReceiver, str]
) -> None:
    """A message that never changes state is never pushed."""
    app, _ = receiver
    still = push_server.state.create_scripted([("processing", 0)])
    moving = push_server.state.create_scripted([("processing", 0), ("delivered", 0.05)])
    wait_for(lambda: push_count(push_server, moving) == 1)
    assert all(b["messageId"] != still for b in app.received())
    assert push_server.state.truth(still)["pushes"] == []


def test_failed_push_is_recorded_not_fatal() -> None:
    """A push to an unreachable URL is recorded with http_status None; serving goes on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    config = SandboxConfig(api_key=KEY, push_url=f"http://127.0.0.1:{dead_port}/hook")
    with SandboxServer(config) as sandbox, httpx.Client(base_url=sandbox.url) as http:
        message_id = sandbox.state.create_scripted([("delivered", 0.05)])
        wait_for(lambda: push_count(sandbox, message_id) == 1)
        pushes = sandbox.state.truth(message_id)["pushes"]
        assert isinstance(pushes, list)
        assert pushes[0]["http_status"] is None
        assert pushes[0]["error"]
        response = http.get(f"/bat/message/{message_id}", headers=HEADER_AUTH)
        assert response.json()["deliverystatus"] == "delivered"


def test_lifespan_binds_loop_for_pushes(receiver: tuple[PushReceiver, str]) -> None:
    """Under a server speaking ASGI lifespan, pushes go out and shutdown closes the client."""
    _, url = receiver

    async def scenario() -> list[dict[str, object]]:
        sandbox = create_app(SandboxConfig(push_url=f"{url}/hook"))
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        lifespan = asyncio.create_task(
            sandbox({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
        )
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
        message_id = sandbox.state.create_scripted([("delivered", 0.05)])
        deadline = time.monotonic() + 5
        while not sandbox.state.truth(message_id)["pushes"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        pushes = sandbox.state.truth(message_id)["pushes"]
        assert isinstance(pushes, list)
        return pushes

    pushes = asyncio.run(scenario())
    assert [p["http_status"] for p in pushes] == [200]


# -------------------------------------------------------------- config & CLI


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"api_key": ""}, "api_key"),
        ({"username": ""}, "username"),
        ({"password": ""}, "password"),
        ({"undeliverable_rate": 1.5}, "undeliverable_rate"),
        ({"permanenterror_rate": -0.1}, "permanenterror_rate"),
        ({"never_final_rate": math.nan}, "never_final_rate"),
        ({"fallback_rate": 2.0}, "fallback_rate"),
        ({"undeliverable_rate": 0.6, "never_final_rate": 0.6}, "undeliverable_rate"),
        ({"processing_after": -1.0}, "processing_after"),
        ({"median_final": 0.0}, "median_final"),
        ({"p95_final": -1.0}, "p95_final"),
        ({"median_final": 10.0, "p95_final": 5.0}, "p95_final"),
        ({"push_timeout": 0.0}, "push_timeout"),
        ({"push_url": "ftp://x"}, "push_url"),
    ],
)
def test_config_validation_names_field(kwargs: dict[str, Any], field: str) -> None:
    """SandboxConfig rejects bad values with a ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**kwargs)


def test_config_sigma() -> None:
    """sigma is ln(p95 / median) / 1.645."""
    config = SandboxConfig(median_final=2.0, p95_final=20.0)
    assert config.sigma == pytest.approx(math.log(10) / 1.645)


def test_create_scripted_validation() -> None:
    """create_scripted rejects empty or decreasing timelines with ValueError."""
    state = SandboxState()
    with pytest.raises(ValueError, match="timeline"):
        state.create_scripted([])
    with pytest.raises(ValueError, match="timeline"):
        state.create_scripted([("processing", 1.0), ("delivered", 0.5)])


def test_main_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """main(["--help"]) prints usage and returns 0."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--push-url" in out
    # Run as a module unless told otherwise: the usage line says how to run it again.
    assert out.startswith("usage: python -m smsbat_tracker.tools.sandbox")


def test_main_usage_names_the_given_program(capsys: pytest.CaptureFixture[str]) -> None:
    """main(prog=...) puts that program in the usage line (the CLI passes its command)."""
    assert main(["--help"], prog="smsbat-tracker sandbox") == 0
    assert capsys.readouterr().out.startswith("usage: smsbat-tracker sandbox")


def test_python_m_runs_the_package() -> None:
    """``python -m smsbat_tracker.tools.sandbox --help`` works (the package's __main__)."""
    done = subprocess.run(
        [sys.executable, "-m", "smsbat_tracker.tools.sandbox", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m smsbat_tracker.tools.sandbox")


def test_main_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns 2 and names the field when a rate is out of range."""
    assert main(["--undeliverable", "2", "--port", "0"]) == 2
    assert "undeliverable_rate" in capsys.readouterr().err


def test_server_url_and_state(server: SandboxServer) -> None:
    """SandboxServer exposes an http://127.0.0.1:<port> URL, its config and its state."""
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
    assert server.port > 0
    assert server.state is server.sandbox.state
    assert server.config.api_key == KEY
