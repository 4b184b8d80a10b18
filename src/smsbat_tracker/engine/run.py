"""One run of a tracking, and the settle a push asks for: Celery-free.

:func:`run_check` is everything a run of ``track_message`` does between its task and the
engine: the first round trip (the session, the outcome, the cache, a turn), the decision,
the API call when the decision asks for one, and the second round trip (the next run
scheduled, fenced, or the outcome settled). The task only turns a :class:`RunOutcome`
into a return value or a retry. :func:`settle_from_cache` ends a tracking from a final
status someone cached (the webhook receiver, ``settle_message``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from smsbat_tracker import metrics
from smsbat_tracker.engine.check import Check
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import Session, build_result
from smsbat_tracker.errors import AnswerLate, SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import (
    Answer,
    Ask,
    AwaitPush,
    Finish,
    Progress,
    TryLater,
    Wait,
    decide,
    line_position,
)
from smsbat_tracker.store.ratelimit import pause_for

__all__ = ["RunOutcome", "RunRequest", "run_check", "settle_from_cache"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run of a tracking: which message, which run, and its times."""

    message_id: str
    owner: str  # this run's task id
    run: int  # its retry number: 0 for the first run
    started_at: float
    deadline_at: float
    due_at: float  # when this run fell due (its ETA), at most ``now``
    now: float


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What a run ends with: a result to return, or a next run ``wait`` seconds on."""

    result: dict[str, Any] | None = None
    wait: float | None = None
    reason: str = ""  # why the next run comes (shown in Flower and the logs)


def run_check(engine: Engine, request: RunRequest) -> RunOutcome:
    """One run of a tracking; see the module docstring."""
    message_id, owner, now = request.message_id, request.owner, request.now
    first_run = not request.run
    # Round trip one: the session, the outcome, the cache, and a turn to ask the API.
    start = engine.start(
        message_id,
        owner=owner,
        run=request.run,
        started_at=request.started_at,
        deadline_at=request.deadline_at,
        due_at=line_position(
            Progress(request.started_at, request.deadline_at), due_at=request.due_at, now=now
        ),
    )
    session, cached = start.session, start.cached
    if start.first:  # once per tracking: not again for a re-drive or a copy given back
        metrics.get().started.inc()
    if start.recorded is not None:
        # Finished already (webhook, an earlier run, another session): claim what is ours.
        settled = engine.settle(message_id, None, claimer=owner).result
        return RunOutcome(result=settled or start.recorded)
    if start.turn is None:  # not the run the session expects
        if first_run and session.owner != owner:
            log.info("track.joined", message_id=message_id, owner=session.owner)
            joined = {"message_id": message_id, "outcome": "joined", "owner": session.owner}
            return RunOutcome(result=joined)
        return RunOutcome(result=superseded(message_id, session.owner))

    progress = session.progress
    rng = engine.rng.random
    decision = decide(progress, cached=cached, now=now, rules=engine.rules, rng=rng)
    answer: Answer | None = None
    if isinstance(decision, Ask):
        try:
            answer = engine.ask(message_id, start.turn, late=True)
        except AnswerLate as exc:  # not a failure: the answer is cached when it comes
            answer = exc
            log.info("track.answer_late", message_id=message_id, wait=exc.wait)
        except (TryLater, SmsbatError) as exc:
            answer = exc
            if isinstance(exc, SmsbatError):
                log.warning("track.api_error", message_id=message_id, error=str(exc))
        decision = decide(
            progress, cached=cached, now=time.time(), rules=engine.rules, answer=answer, rng=rng
        )
    assert not isinstance(decision, Ask)  # an answer is never followed by another ask
    asked = answer is not None and not isinstance(answer, TryLater)
    # Round trip two writes what this run learned, with its next step.
    check = Check(
        answer=answer if isinstance(answer, MessageStatus) else None,
        asked=asked,
        unused_turn=start.turn.taken and answer is None,
        pushed=isinstance(decision, AwaitPush) and not session.pushed,
        pause=pause_for(answer),
    )
    if isinstance(decision, AwaitPush):
        # The provider pushes this message's changes; the webhook will end tracking.
        log.debug("track.awaiting_push", message_id=message_id, next_in=round(decision.seconds, 3))
        return _next_run(engine, request, session, decision, check)
    status = decision.status
    if isinstance(decision, Wait) and decision.failed:
        log.info("track.retry", message_id=message_id, next_in=round(decision.seconds, 3))
    elif asked or (isinstance(decision, Wait) and decision.counted):
        # DEBUG: a check a few seconds; the tracking's end (track.final) is at INFO.
        log.debug(
            "track.check",
            message_id=message_id,
            deliverystatus=status.deliverystatus if status else None,
            source="api" if asked else "cache",
            attempt=session.checks + 1,
            next_in=round(decision.seconds, 3) if isinstance(decision, Wait) else None,
        )
    if isinstance(decision, Finish):
        source: str | None = None  # a timeout or an error came from no final status
        if decision.outcome in ("timeout", "error"):
            pass
        elif isinstance(answer, MessageStatus):
            source = "poll"
        elif cached is not None and status is cached.status:
            source = cached.source
        result = build_result(
            message_id,
            decision.outcome,
            status=status,
            source=source,
            started_at=session.started_at,
            polls=session.polls + (1 if asked else 0),
            error=decision.error,
            retries=session.retries,
        )
        return RunOutcome(
            result=engine.settle(message_id, result, claimer=owner, check=check).result
        )
    return _next_run(engine, request, session, decision, check)


def _next_run(
    engine: Engine, request: RunRequest, session: Session, decision: Wait | AwaitPush, check: Check
) -> RunOutcome:
    """Schedule the next run as ``decision`` says; fenced: a superseded run stops instead."""
    wait = decision.seconds
    if not engine.reschedule(
        request.message_id,
        owner=request.owner,
        run=request.run,
        next_at=time.time() + wait,
        counted=isinstance(decision, Wait) and decision.counted,
        failed=isinstance(decision, Wait) and decision.failed,
        check=check,
        why=reason_kind(decision),
    ):
        return RunOutcome(result=superseded(request.message_id, session.owner))
    return RunOutcome(wait=wait, reason=reason(decision))


def reason_kind(decision: Wait | AwaitPush) -> str:
    """The kind of :func:`reason`, counted per tracking (the result's ``retries``)."""
    if isinstance(decision, AwaitPush):
        return "awaiting_push"
    if decision.failed:
        return "request_failed"
    if not decision.counted:
        return "no_turn"
    return "in_flight"


def reason(decision: Wait | AwaitPush) -> str:
    """Why the next run comes, from the decision that schedules it."""
    wait = f"{decision.seconds:.1f} s"
    if isinstance(decision, AwaitPush):
        return f"awaiting the provider's push; next look in {wait}"
    if decision.failed:
        return f"the request failed; retry in {wait}"
    if not decision.counted:
        return f"no turn to ask the API yet; next try in {wait}"
    status = decision.status.deliverystatus if decision.status else "no status yet"
    return f"{status}; next check in {wait}"


def superseded(message_id: str, owner: str) -> dict[str, Any]:
    """A run whose tracking was taken over (re-driven) or that is a stale copy: it stops."""
    log.info("track.superseded", message_id=message_id, owner=owner)
    return {"message_id": message_id, "outcome": "superseded", "owner": owner}


def settle_from_cache(engine: Engine, message_id: str, *, claimer: str) -> dict[str, Any] | None:
    """End a tracked message whose cached status is final; None when there is nothing to end.

    The webhook receiver calls this in its own process, one queue hop sooner than
    ``settle_message``; both go through the engine's exactly-once settle.
    """
    cached = engine.cache.get(message_id)
    session = engine.session(message_id)
    if session is None and cached is not None and cached.is_final:
        # A push after the tracking ended (a duplicate): the settle finds the outcome and
        # cuts what the message keeps back to it (the push's cache entry included).
        engine.settle(message_id, None, claimer=claimer)
        return None
    if cached is None or not cached.is_final or session is None:
        return None
    decision = decide(
        session.progress, cached=cached, now=time.time(), rules=engine.rules, rng=engine.rng.random
    )
    if not isinstance(decision, Finish):
        return None
    result = build_result(
        message_id,
        decision.outcome,
        status=decision.status,
        source=cached.source,
        started_at=session.started_at,
        polls=session.polls,
        retries=session.retries,
    )
    return engine.settle(message_id, result, claimer=claimer).result
