"""The tracking rules (smsbat_tracker.rules.decide): one pure function, table-driven."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsbat_tracker.config import load_settings
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
    campaign_ends_at,
    campaign_over,
    decide,
    expire,
    line_position,
    outcome_of,
)
from smsbat_tracker.rules.schedule import Schedule, compute_backoff
from smsbat_tracker.rules.seen import CachedStatus

NOW = 1_000_000.0
# No jitter: waits are exact. First check 5 s after the start, doubling to 10 s at most.
# The jitter's midpoint: no spread, so waits read exactly.
MID = lambda: 0.5  # noqa: E731

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
    assert (
        decide(progress, cached=cached_status, now=NOW, rules=RULES, rng=MID, answer=answer)
        == expected
    )


def test_pushes_untrusted_are_polled() -> None:
    """With SMSBAT_TRUST_PUSHES off a pushed message is polled like any other."""
    rules = Rules(RULES.schedule, 30.0, 1.0, False, 900.0)
    assert (
        decide(RUNNING, cached=cached("processing", source="push"), now=NOW, rules=rules, rng=MID)
        == Ask()
    )


def test_the_last_wait_lands_on_the_deadline() -> None:
    """Three seconds before the deadline the next check is the deadline check."""
    progress = Progress(started_at=NOW - 50, deadline_at=NOW + 3, checks=5)
    assert decide(
        progress, cached=None, now=NOW, rules=RULES, answer=status("processing"), rng=MID
    ) == Wait(3.0, status=status("processing"))


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
    decision = decide(progress, cached=None, now=NOW, rules=RULES, rng=MID, answer=status(value))
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
    decision = decide(progress, cached=None, now=NOW, rules=RULES, rng=MID, answer=failure)
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


# ------------------------------------------------------------------ jitter from the caller

JITTERY = Rules(
    schedule=Schedule(first_delay=5.0, factor=2.0, max_delay=20.0, jitter=0.1, min_interval=1.0),
    not_found_grace=30.0,
    fresh_for=1.0,
    trust_pushes=True,
    push_wait=900.0,
)


def test_the_next_waits_jitter_comes_from_the_rng_passed_in() -> None:
    """A seeded ``random.Random`` gives the exact wait compute_backoff gives with the same
    draw (attempt 1: base 10 s, +0.28 s with seed 42); the global ``random`` is untouched."""
    before = random.getstate()
    decision = decide(
        Progress(NOW - 20, NOW + 100, checks=0),
        cached=None,
        now=NOW,
        rules=JITTERY,
        answer=status("processing"),
        rng=random.Random(42).random,
    )
    assert random.getstate() == before
    expected = compute_backoff(
        1, first_delay=5.0, factor=2.0, max_delay=20.0, jitter=0.1, rng=random.Random(42).random
    )
    assert decision == Wait(expected, status=status("processing"))
    assert expected == pytest.approx(10.0 + 1.0 * (2 * 0.6394267984578837 - 1))


def test_the_same_seed_gives_the_same_waits() -> None:
    """Two runs with one seed decide the same waits; the draws stay within ±jitter."""
    progress = [Progress(NOW - 20, NOW + 100, checks=n) for n in range(6)]

    def waits(seed: int) -> list[float]:
        rng = random.Random(seed).random
        out = []
        for p in progress:
            decision = decide(
                p, cached=None, now=NOW, rules=JITTERY, answer=status("processing"), rng=rng
            )
            assert isinstance(decision, Wait)
            out.append(decision.seconds)
        return out

    assert waits(3) == waits(3)
    for seconds, p in zip(waits(3), progress, strict=True):
        base = min(20.0, 5.0 * 2.0 ** (p.checks + 1))
        assert 0.9 * base - 1e-9 <= seconds <= min(20.0, 1.1 * base) + 1e-9


# ------------------------------------------------------------------ the end of a campaign


def _at_deadline_today(progress: Progress, cached_status: CachedStatus | None) -> Any:
    """The campaign's former ``_at_deadline``, as it was: ``now`` faked to the end of the
    deadline's grace, then a TryLater(0) answer when the rules asked to ask."""
    now = max(NOW, progress.deadline_at + RULES.deadline_grace)
    decision = decide(progress, cached=cached_status, now=now, rules=RULES, rng=MID)
    if isinstance(decision, Ask):
        decision = decide(
            progress, cached=cached_status, now=now, rules=RULES, answer=TryLater(0.0), rng=MID
        )
    return decision


@pytest.mark.parametrize(
    ("cached_status", "expected"),
    [
        pytest.param(None, Finish("timeout", None, NO_ANSWER), id="nothing seen"),
        pytest.param(
            cached("processing"),
            Finish("timeout", status("processing"), NO_ANSWER),
            id="last seen in flight",
        ),
        pytest.param(
            cached("processing", source="push"),
            Finish("timeout", status("processing"), NO_ANSWER),
            id="pushed, in flight",
        ),
        pytest.param(
            cached("delivered", age=0.0), Finish("delivered", status("delivered")), id="final"
        ),
        pytest.param(
            cached("undeliverable", source="push"),
            Finish("undeliverable", status("undeliverable")),
            id="pushed final",
        ),
    ],
)
def test_a_message_open_when_its_campaign_ends_expires_as_before(
    cached_status: CachedStatus | None, expected: Finish
) -> None:
    """expire() ends a message as the faked-``now`` decide of ``_at_deadline`` did, before
    and after the deadline: its cached final status, else a timeout saying no answer came."""
    assert expire(cached_status) == expected
    for deadline_at in (NOW + 50, NOW, NOW - 30):
        assert _at_deadline_today(Progress(NOW - 120, deadline_at), cached_status) == expected


def test_no_answer_at_the_end_of_the_grace_is_expire() -> None:
    """decide's last rule (no answer by the end of the deadline's grace) is expire's end."""
    progress = Progress(started_at=NOW - 130, deadline_at=NOW - 10, checks=9, failures=5)
    for seen in (None, cached("processing")):
        decision = decide(
            progress, cached=seen, now=NOW, rules=RULES, rng=MID, answer=ServerError(500)
        )
        assert decision == expire(seen)


def test_a_campaign_is_over_when_nothing_is_left() -> None:
    """No message left ends the campaign at once, even long before its deadline; some left
    (or not counted yet) before the deadline's end does not."""
    assert campaign_over(RULES, deadline_at=NOW + 500, now=NOW, left=0)
    assert not campaign_over(RULES, deadline_at=NOW + 500, now=NOW, left=3)
    assert not campaign_over(RULES, deadline_at=NOW + 500, now=NOW)


@pytest.mark.parametrize(
    ("after_deadline", "over"),
    [(0.0, False), (10.0, False), (21.0, False), (21.001, True), (500.0, True)],
)
def test_a_campaign_is_over_a_grace_and_a_tick_after_its_deadline(
    after_deadline: float, over: bool
) -> None:
    """Today's end in ``tick``: past deadline + deadline_grace + max_delay + min_interval
    (10 + 10 + 1 s here), whatever is left; exactly at it, not yet."""
    deadline_at = NOW - after_deadline
    grace = RULES.deadline_grace + RULES.schedule.max_delay + RULES.schedule.min_interval
    assert campaign_over(RULES, deadline_at=deadline_at, now=NOW, left=7) is over
    assert campaign_over(RULES, deadline_at=deadline_at, now=NOW) is over
    assert (deadline_at + grace < NOW) is over  # the condition tick() tests today
    assert campaign_ends_at(RULES, deadline_at=deadline_at) == deadline_at + grace


def test_a_campaigns_end_reads_the_settings_tick_read() -> None:
    """With rules from the settings, the end is tick()'s ``settings.deadline_grace +
    settings.max_delay + settings.min_interval`` after the deadline."""
    settings = load_settings(api_key="k", deadline_grace=7.0, max_delay=12.0, min_interval=2.0)
    rules = Rules.from_settings(settings, Schedule.from_settings(settings))
    grace = settings.deadline_grace + settings.max_delay + settings.min_interval
    assert campaign_ends_at(rules, deadline_at=NOW) == NOW + grace == NOW + 21.0
