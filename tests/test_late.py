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
from smsbat_tracker.engine.late import (
    SAMPLES_MIN,
    WAIT_FACTOR,
    WAIT_MIN,
    LateAnswers,
    wait_for_answers,
)
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


def test_the_wait_is_the_setting_until_enough_answers_were_timed() -> None:
    """Fewer than SAMPLES_MIN answers say nothing of the provider's pace: the setting."""
    assert wait_for_answers([], 0.5) == 0.5
    assert wait_for_answers([0.001] * (SAMPLES_MIN - 1), 0.5) == 0.5


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (0.005, WAIT_MIN),  # fast answers: the floor, not 0.02 s
        (0.1, 0.1 * WAIT_FACTOR),  # between the floor and the setting
        (0.3, 0.5),  # slow usual answers: never past the setting
    ],
)
def test_the_wait_follows_the_answers_95th_percentile(answer: float, expected: float) -> None:
    """WAIT_FACTOR times the recent answers' p95, between WAIT_MIN and the setting; the
    slowest 5 % (one in twenty past the others) do not move it."""
    durations = [answer] * 95 + [2.9] * 5
    assert wait_for_answers(durations, 0.5) == pytest.approx(expected)
    assert wait_for_answers([*durations, 2.9], 0.5) == 0.5  # past 5 %: the slow ones count


def test_a_process_times_the_answers_it_gets_and_adapts_its_wait() -> None:
    """Answers returned are timed, failed requests are not; the wait is worked out again
    every SAMPLES_MIN answers (exact values come from observe(): real timings vary with
    the machine's load)."""
    late = LateAnswers(0.5)
    assert late.wait == 0.5
    for _ in range(SAMPLES_MIN):
        assert late.get(lambda: "processing", lambda _: None) == "processing"
    assert len(late._durations) == SAMPLES_MIN
    assert late.wait == wait_for_answers(list(late._durations), 0.5)

    def failing() -> str:
        raise RequestTimeout("read timeout")

    for _ in range(SAMPLES_MIN):
        with pytest.raises(RequestTimeout):
            late.get(failing, lambda _: None)
    assert len(late._durations) == SAMPLES_MIN
    late.close()


def test_a_late_answer_says_the_wait_it_was_given() -> None:
    """After fast answers the run waits the floor, and AnswerLate says so; once slow
    answers make up the recent ones, the wait is back at the setting."""
    late = LateAnswers(0.5)
    for _ in range(SAMPLES_MIN):
        late.observe(0.001)
    assert late.wait == WAIT_MIN
    release = threading.Event()
    with pytest.raises(AnswerLate, match=r"0\.25 s") as raised:
        late.get(lambda: release.wait(10), lambda _: None)
    assert raised.value.wait == WAIT_MIN
    release.set()
    for _ in range(2 * SAMPLES_MIN):
        late.observe(0.2)
    assert late.wait == 0.5
    late.close()


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
