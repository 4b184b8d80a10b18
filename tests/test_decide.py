"""The tracking rules (smsbat_tracker.rules.decide): one pure function, table-driven."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsbat_tracker.errors import (
    ConnectionFailed,
    MalformedResponse,
    MessageNotFound,
    PermanentError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SmsbatError,
)
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import (
    NO_ANSWER,
    Ask,
    AwaitPush,
    Finish,
    Progress,
    Rules,
    TryLater,
    Wait,
    decide,
    line_position,
    outcome_of,
)
from smsbat_tracker.rules.schedule import Schedule
from smsbat_tracker.rules.seen import CachedStatus

NOW = 1_000_000.0
# No jitter: waits are exact. First check 5 s after the start, doubling to 10 s at most.
RULES = Rules(
    schedule=Schedule(first_delay=5.0, factor=2.0, max_delay=10.0, jitter=0.0, min_interval=1.0),
    not_found_grace=30.0,
    fresh_for=1.0,
    trust_pushes=True,
    push_wait=900.0,
    deadline_grace=10.0,
)
RUNNING = Progress(started_at=NOW - 20, deadline_at=NOW + 100, checks=2)
AT_DEADLINE = Progress(started_at=NOW - 120, deadline_at=NOW, checks=9)


def status(value: str) -> MessageStatus:
    return MessageStatus(deliverystatus=value)


def cached(value: str, *, age: float = 5.0, source: str = "poll") -> CachedStatus:
    return CachedStatus(status=status(value), observed_at=NOW - age, source=source)  # type: ignore[arg-type]


CASES: list[tuple[str, Progress, CachedStatus | None, Any, Any]] = [
    # id, progress, cached, answer, expected decision
    ("nothing known: ask", RUNNING, None, None, Ask()),
    ("stale cache: ask", RUNNING, cached("processing"), None, Ask()),
    (
        "cached final: finish, no request",
        RUNNING,
        cached("delivered"),
        None,
        Finish("delivered", status("delivered")),
    ),
    (
        "fresh cache is as good as asking",
        RUNNING,
        cached("processing", age=0.5),
        None,
        Wait(10.0, status=status("processing")),
    ),
    (
        "at the deadline a fresh cache is not enough",
        AT_DEADLINE,
        cached("processing", age=0.1),
        None,
        Ask(),
    ),
    (
        "a pushed message waits for the push",
        RUNNING,
        cached("processing", source="push"),
        None,
        AwaitPush(100.0),
    ),
    ("pushed, at the deadline: ask", AT_DEADLINE, cached("processing", source="push"), None, Ask()),
    (
        "final answer",
        RUNNING,
        None,
        status("undeliverable"),
        Finish("undeliverable", status("undeliverable")),
    ),
    (
        "not final: next on the schedule",
        RUNNING,
        None,
        status("processing"),
        Wait(10.0, status=status("processing")),
    ),
    (
        "not final at the deadline: timeout",
        AT_DEADLINE,
        None,
        status("processing"),
        Finish("timeout", status("processing")),
    ),
    (
        "permanent error",
        RUNNING,
        None,
        PermanentError(410),
        Finish("error", None, str(PermanentError(410))),
    ),
    ("not found within the grace: keep checking", RUNNING, None, MessageNotFound("x"), Wait(10.0)),
    (
        "not found past the grace",
        Progress(started_at=NOW - 60, deadline_at=NOW + 60, checks=4),
        None,
        MessageNotFound("x"),
        Finish("error", None, str(MessageNotFound("x"))),
    ),
    (
        "a 5xx is no check: retried in 1 s",
        RUNNING,
        None,
        ServerError(503),
        Wait(1.0, counted=False, failed=True),
    ),
    (
        "the third failure in a row: still 1 s",
        Progress(started_at=NOW - 20, deadline_at=NOW + 100, checks=2, failures=2),
        None,
        RequestTimeout("slow"),
        Wait(1.0, counted=False, failed=True),
    ),
    (
        "an API that keeps failing is backed off",
        Progress(started_at=NOW - 20, deadline_at=NOW + 100, checks=2, failures=17),
        None,
        MalformedResponse("not JSON"),
        Wait(4.0, counted=False, failed=True),
    ),
    (
        "a 429 is no check; its Retry-After is honoured",
        RUNNING,
        None,
        RateLimited(3.0),
        Wait(3.0, counted=False, failed=True),
    ),
    (
        "a failure just before the deadline: retried at the deadline",
        Progress(started_at=NOW - 50, deadline_at=NOW + 0.5, checks=5),
        cached("processing"),
        ConnectionFailed("reset"),
        Wait(0.5, counted=False, status=status("processing"), failed=True),
    ),
    (
        "turned away by the limit: not a check",
        RUNNING,
        None,
        TryLater(2.5, "rate"),
        Wait(2.5, counted=False),
    ),
    (
        "the deadline check failed: retried within the grace",
        AT_DEADLINE,
        cached("processing"),
        ServerError(500),
        Wait(1.0, counted=False, status=status("processing"), failed=True),
    ),
    (
        "the deadline check turned away: retried within the grace",
        AT_DEADLINE,
        cached("processing"),
        TryLater(1.0),
        Wait(1.0, counted=False, status=status("processing")),
    ),
    (
        "a retry never passes the end of the grace",
        Progress(started_at=NOW - 128, deadline_at=NOW - 8, checks=9, failures=18),
        None,
        ServerError(500),
        Wait(2.0, counted=False, failed=True),
    ),
    (
        "no answer by the end of the grace: timeout, saying so",
        Progress(started_at=NOW - 130, deadline_at=NOW - 10, checks=9, failures=5),
        cached("processing"),
        ServerError(500),
        Finish("timeout", status("processing"), NO_ANSWER),
    ),
    (
        "an answer within the grace counts: final",
        Progress(started_at=NOW - 125, deadline_at=NOW - 5, checks=9, failures=3),
        None,
        status("delivered"),
        Finish("delivered", status("delivered")),
    ),
]


@pytest.mark.parametrize(
    ("progress", "cached_status", "answer", "expected"),
    [pytest.param(p, c, a, e, id=i) for i, p, c, a, e in CASES],
)
def test_decide(
    progress: Progress, cached_status: CachedStatus | None, answer: Any, expected: Any
) -> None:
    """Each rule of the module docstring, as a row."""
    assert decide(progress, cached=cached_status, now=NOW, rules=RULES, answer=answer) == expected


def test_pushes_untrusted_are_polled() -> None:
    """With SMSBAT_TRUST_PUSHES off a pushed message is polled like any other."""
    rules = Rules(RULES.schedule, 30.0, 1.0, False, 900.0)
    assert (
        decide(RUNNING, cached=cached("processing", source="push"), now=NOW, rules=rules) == Ask()
    )


def test_the_last_wait_lands_on_the_deadline() -> None:
    """Three seconds before the deadline the next check is the deadline check."""
    progress = Progress(started_at=NOW - 50, deadline_at=NOW + 3, checks=5)
    assert decide(progress, cached=None, now=NOW, rules=RULES, answer=status("processing")) == Wait(
        3.0, status=status("processing")
    )


@given(
    value=st.sampled_from(
        ["scheduled", "processing", "delivered", "undeliverable", "permanenterror", "sending"]
    ),
    left=st.floats(min_value=-5, max_value=200),
    checks=st.integers(min_value=0, max_value=50),
)
def test_an_answer_always_ends_or_waits_within_the_deadline(
    value: str, left: float, checks: int
) -> None:
    """Any status answer: a final one finishes with its outcome; otherwise the wait never
    passes the deadline, and at the deadline the outcome is timeout."""
    progress = Progress(started_at=NOW - 10, deadline_at=NOW + left, checks=checks)
    decision = decide(progress, cached=None, now=NOW, rules=RULES, answer=status(value))
    if status(value).is_final:
        assert decision == Finish(outcome_of(status(value)), status(value))
    elif isinstance(decision, Wait):
        assert 0 < decision.seconds <= left + 1e-6  # float sums: NOW + left - NOW
        assert decision.counted
    else:
        assert decision == Finish("timeout", status(value))
        assert left <= 0.05 + 1e-6


FAILURES = st.sampled_from(
    [
        ServerError(500),
        ServerError(503),
        RateLimited(1.0),
        RateLimited(None),
        RequestTimeout("read"),
        ConnectionFailed("reset"),
        MalformedResponse("not JSON"),
    ]
)


@given(
    failure=FAILURES,
    left=st.floats(min_value=-15, max_value=200),
    checks=st.integers(min_value=0, max_value=50),
    failures=st.integers(min_value=0, max_value=20),
)
def test_a_failed_request_is_never_a_check(
    failure: SmsbatError, left: float, checks: int, failures: int
) -> None:
    """Whatever failed and whenever: the schedule's step is kept (not counted), the retry
    comes within 1-10 s (or the Retry-After), never past the deadline, nor past the end of
    the deadline's grace; only there does the tracking end, as a timeout that says no
    answer came."""
    progress = Progress(NOW - 10, NOW + left, checks=checks, failures=failures)
    decision = decide(progress, cached=None, now=NOW, rules=RULES, answer=failure)
    if left + RULES.deadline_grace <= 0.05:
        assert decision == Finish("timeout", None, NO_ANSWER)
        return
    assert isinstance(decision, Wait)
    assert not decision.counted
    assert decision.failed
    bound = left if left > 0.05 else left + RULES.deadline_grace
    assert 0 <= decision.seconds <= max(bound, 0) + 1e-6
    assert decision.seconds <= 10.0 or decision.seconds == bound


def test_a_check_at_its_deadline_goes_first_in_the_rate_limits_line() -> None:
    """Checks stand in the rate limit's line by when they fell due; a check at its deadline
    (or in its grace) stands before all of them, the earliest deadline first."""
    assert line_position(RUNNING, due_at=NOW - 1, now=NOW) == NOW - 1
    at = line_position(Progress(NOW - 60, NOW), due_at=NOW, now=NOW)
    earlier = line_position(Progress(NOW - 60, NOW - 5), due_at=NOW, now=NOW)
    assert earlier < at < NOW - 1000
