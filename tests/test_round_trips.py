"""How many Redis round trips the tracker itself makes per check, counted on the wire.

Every request the engine's Redis client sends is recorded (the packed commands of one
send are one round trip), while a real worker tracks a message on the sandbox API
through the global rate limit. Celery's own traffic (the broker, the result backend) and
the re-driver's heartbeat use other clients and are not counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.connection

from smsbat_tracker.celery.track import track_message
from smsbat_tracker.config import Settings
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import recorded, wait_for


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The tests' fast schedule, with the global rate limit on (its token is in the count)."""
    return make_settings(rate_limit=50.0)


def parse_commands(packed: bytes) -> list[list[bytes]]:
    """The commands in one packed RESP request (a pipeline packs several)."""
    commands: list[list[bytes]] = []
    at = 0
    while at < len(packed):
        end = packed.index(b"\r\n", at)
        assert packed[at : at + 1] == b"*", packed[at : at + 20]
        count, at = int(packed[at + 1 : end]), end + 2
        parts = []
        for _ in range(count):
            end = packed.index(b"\r\n", at)
            size = int(packed[at + 1 : end])
            parts.append(packed[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
        commands.append(parts)
    return commands


class Wire:
    """Records each request sent on the connections of one client's pool."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.requests: list[list[list[bytes]]] = []
        self.lock = threading.Lock()

    def names(self, request: list[list[bytes]], scripts: dict[str, str]) -> str:
        """One request as text: command names, a script by its name."""
        out = []
        for command in request:
            name = command[0].decode().upper()
            if name == "EVALSHA":
                name = scripts.get(command[1].decode(), "EVALSHA?")
            out.append(name)
        return "+".join(out)


@pytest.fixture
def wire(tracker_app: Any, monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Counts the round trips of the engine's Redis client."""
    recorder = Wire(tracker_app.engine.redis)
    original = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if self in recorder.pool._in_use_connections:  # type: ignore[attr-defined]
            chunks = command if isinstance(command, list) else [command]
            packed = b"".join(c if isinstance(c, bytes) else bytes(c) for c in chunks)
            with recorder.lock:
                recorder.requests.append(parse_commands(packed))
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    return recorder


def test_a_check_costs_two_round_trips(
    worker: Any,
    tracker_app: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    wire: Wire,
) -> None:
    """Each run of track_message makes two round trips of its own: one script before the
    API call (session, cache, gate, token) and one after (store, count, reschedule or
    record the outcome). Sending the outcome's callback adds its own two (noted before
    it is published, marked sent after)."""
    engine = tracker_app.engine
    sig = record_outcome.s()
    scripts = {
        engine.checks.before.sha: "BEFORE",
        engine.checks.after_check.sha: "AFTER",
        engine.sessions.register_script.sha: "REGISTER",
        engine.dispatcher.mark_sent.sha: "SENT",
    }

    def marked_sent() -> bool:
        # A callback is marked sent after its publish returns: on a busy machine it can run,
        # and be recorded, before that round trip is made.
        with wire.lock:
            return any(wire.names(r, scripts) == "SENT" for r in wire.requests)

    # Warm up: the scripts are loaded, the queues tracker workers consume are read.
    warm = sandbox.state.create_scripted([("delivered", 0)])
    track_message.delay(warm, on_delivered=sig)
    wait_for(lambda: recorded(redis_client), timeout=15)
    wait_for(marked_sent, timeout=10)
    redis_client.delete("smsbat:recorded:default")
    with wire.lock:
        wire.requests.clear()

    mid = sandbox.state.create_scripted([("scheduled", 0), ("processing", 0.5), ("delivered", 2.5)])
    track_message.delay(mid, on_delivered=sig)
    [entry] = wait_for(lambda: recorded(redis_client), timeout=20)
    assert entry["result"]["outcome"] == "delivered"
    wait_for(marked_sent, timeout=10)
    polls = sandbox.state.truth(mid)["polls"]
    # A new connection's handshake, and a connection's health check (a PING when it has been
    # idle for the client's health_check_interval), are not a check's.
    handshake = {"CLIENT", "HELLO", "AUTH", "SELECT", "PING"}
    trips = [t for r in wire.requests if (t := wire.names(r, scripts)) not in handshake]
    runs = trips.count("BEFORE")
    assert runs >= polls >= 3, trips
    assert trips.count("AFTER") == runs, trips
    # Which queues tracker workers consume is read at most once in QUEUES_CACHE s.
    assert trips.count("HGETALL") <= 1, trips
    rest = [t for t in trips if t not in ("BEFORE", "AFTER", "HGETALL")]
    # The enqueue's registration; the callback marked sent after it is published (and
    # noted before, when a tracker worker consumes its queue); the callback itself.
    dispatch = ["SENT"] + (["ZADD+HSET"] if engine.dispatcher.queues_seen[1] else [])
    assert sorted(rest) == sorted(["REGISTER", "RPUSH", *dispatch]), trips
