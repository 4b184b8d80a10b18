"""A check waits a moment for the API's answer; a later answer is cached when it comes
(engine/late.py), end to end on the sandbox and Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.late import LateAnswers
from smsbat_tracker.engine.run import run_check
from smsbat_tracker.errors import AnswerLate, RequestTimeout
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import wait_for
from tests.test_run import _register, _request


def test_an_answer_within_the_wait_is_returned() -> None:
    """A fast answer comes back as it is; nothing is kept for later."""
    kept: list[str] = []
    assert LateAnswers(1.0).get(lambda: "delivered", kept.append) == "delivered"
    assert kept == []


def test_a_late_answer_raises_then_is_kept_when_it_comes() -> None:
    """Past the wait the run gets AnswerLate (a RequestTimeout: retried as one) at once;
    the request goes on, and its answer is handed to ``keep`` when it comes."""
    release, kept = threading.Event(), threading.Event()
    answers: list[str] = []

    def slow() -> str:
        assert release.wait(10)
        return "processing"

    def keep(answer: str) -> None:
        answers.append(answer)
        kept.set()

    late = LateAnswers(0.05)
    began = time.monotonic()
    with pytest.raises(AnswerLate, match="SMSBAT_ANSWER_WAIT") as raised:
        late.get(slow, keep)
    assert time.monotonic() - began < 5  # the run was not held for the answer
    assert isinstance(raised.value, RequestTimeout)
    assert answers == []
    release.set()
    assert kept.wait(10)
    assert answers == ["processing"]


def test_a_late_request_that_fails_keeps_nothing_and_raises_nowhere() -> None:
    """A late request that then fails (its read timeout) is dropped: the run that gave up
    on it retries anyway; no log line of a lost answer."""
    release, finished = threading.Event(), threading.Event()
    kept: list[Any] = []

    def failing() -> str:
        try:
            assert release.wait(10)
            raise RequestTimeout("read timeout")
        finally:
            finished.set()

    with capture_logs() as logs, pytest.raises(AnswerLate):
        LateAnswers(0.05).get(failing, kept.append)
    release.set()
    assert finished.wait(10)
    assert kept == []
    assert not [e for e in logs if e["event"] == "track.late_answer_lost"]


def test_a_forked_process_makes_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool made before a fork has no threads in the child: the child makes its own."""
    late = LateAnswers(1.0)
    assert late.get(lambda: 1, lambda _: None) == 1
    first = late._pool
    monkeypatch.setattr("os.getpid", lambda: -1)
    assert late.get(lambda: 2, lambda _: None) == 2
    assert late._pool is not first
    late.close()


@pytest.fixture
def slow_engine(make_settings: Callable[..., Settings]) -> Iterator[Engine]:
    """An engine that waits 0.2 s for an answer, with a 3 s read timeout."""
    settings = make_settings(
        key_prefix=f"late{uuid.uuid4().hex[:8]}", answer_wait=0.2, read_timeout=3.0
    )
    client: redis.Redis = redis_client(settings, decode_responses=True)
    api = SmsbatClient.from_settings(settings)
    yield Engine(settings, client, api, app=None)
    api.close()
    client.close()


def test_a_slow_answer_holds_the_run_a_moment_and_the_next_run_reads_it_cached(
    slow_engine: Engine, sandbox: SandboxServer
) -> None:
    """The sandbox answers after 0.8 s: the run returns after the 0.2 s wait with a retry
    (logged as a late answer, not an error); the answer is cached when it comes, and the
    next run ends the tracking from the cache without asking the API again."""
    engine = slow_engine
    mid = sandbox.state.create_scripted([("delivered", 0)])
    _register(engine, mid, "owner-late")
    sandbox.state.set_faults(slow_rate=1.0, slow_seconds=0.8)
    try:
        began = time.monotonic()
        with capture_logs() as logs:
            first = run_check(engine, _request(engine, mid, "owner-late"))
        held = time.monotonic() - began
        assert first.result is None
        assert first.wait is not None
        assert held < 0.8  # not held for the answer, nor for the read timeout
        events = [e["event"] for e in logs]
        assert "track.answer_late" in events
        assert "track.api_error" not in events
        cached = wait_for(lambda: engine.cache.get(mid), timeout=10)
        assert cached.status.deliverystatus == "delivered"
    finally:
        sandbox.state.clear_faults()
    asked = len(sandbox.state.truth(mid)["poll_times"])
    second = run_check(engine, _request(engine, mid, "owner-late", run=1))
    assert second.result is not None
    assert second.result["outcome"] == "delivered"
    assert len(sandbox.state.truth(mid)["poll_times"]) == asked  # read from the cache
