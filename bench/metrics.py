"""The figures of one mode, from the sandbox's ground truth and what the mode reported.

Everything is computed from two sources only: the sandbox's truth of every message (when
it turned final, every status request it served, every push it sent) and, per message,
what the mode concluded and when it knew (:class:`Observation`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BORDERLINE",
    "PHASE_S",
    "Observation",
    "evaluate",
    "per_message",
    "percentile",
    "push_latency",
]

# Push latency is also split at this many seconds of tracking: before it, every tracker's
# first run and first check compete with the pushes for the worker.
PHASE_S = 10.0
# A status that turned final within this of a mode's deadline may be reported either way.
BORDERLINE = 1.0
_EXAMPLES = 20  # wrong or missing cases kept verbatim in the JSON results


@dataclass(frozen=True, slots=True)
class Observation:
    """What a mode concluded about one message.

    ``started_at``: when the mode began tracking it (its deadline counts from there);
    ``known_at``: when the mode knew the outcome (loop return, callback ``recorded_at``).
    """

    outcome: str
    started_at: float
    known_at: float | None
    source: str | None = None
    polls: int | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": _r(percentile(values, 0.50)),
        "p95": _r(percentile(values, 0.95)),
        "p99": _r(percentile(values, 0.99)),
        "max": _r(max(values) if values else None),
        "mean": _r(sum(values) / len(values) if values else None),
    }


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def evaluate(
    truths: Iterable[Mapping[str, Any]],
    observations: Mapping[str, Observation],
    *,
    deadline: float,
    last_check_before: float | None = None,
) -> dict[str, Any]:
    """Calls, detection delay, correctness and peak request rate of one mode.

    ``last_check_before``: for a loop that stops checking ``last_check_before`` seconds
    before it gives up (the documented loop's last check is at 55 s of 60 s), how many of
    its wrong outcomes fall in that blind window, reported apart so the reader can judge.
    """
    truths = list(truths)
    n = len(truths)
    calls = sum(int(t["polls"]) for t in truths)
    per_second: Counter[int] = Counter(int(pt) for t in truths for pt in t["poll_times"])
    delays: list[float] = []
    outcomes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    right = wrong = missing = borderline = blind = 0
    examples: list[dict[str, Any]] = []
    reported_polls = 0
    for truth in truths:
        message_id = str(truth["messageId"])
        final_status: str | None = truth["final_status"]
        final_at: float | None = truth["final_at"]
        obs = observations.get(message_id)
        if obs is None:
            missing += 1
            outcomes["missing"] += 1
            if len(examples) < _EXAMPLES:
                examples.append({"messageId": message_id, "problem": "missing"})
            continue
        outcomes[obs.outcome] += 1
        if obs.source:
            sources[obs.source] += 1
        reported_polls += obs.polls or 0
        limit = obs.started_at + deadline
        in_time = final_at is not None and final_at <= limit
        expected = final_status if in_time else "timeout"
        near = final_at is not None and abs(final_at - limit) < BORDERLINE
        if obs.outcome == expected or (near and obs.outcome in (final_status, "timeout")):
            right += 1
            borderline += near
        else:
            wrong += 1
            after = None if final_at is None else round(final_at - obs.started_at, 3)
            in_blind = (
                last_check_before is not None
                and after is not None
                and deadline - last_check_before < after <= deadline
            )
            blind += in_blind
            if len(examples) < _EXAMPLES:
                examples.append(
                    {
                        "messageId": message_id,
                        "problem": "wrong",
                        "outcome": obs.outcome,
                        "expected": expected,
                        "final_after_s": after,
                        "blind_window": in_blind,
                    }
                )
        if in_time and obs.known_at is not None and obs.outcome == final_status:
            assert final_at is not None
            delays.append(obs.known_at - final_at)
    final_in_time = sum(
        1
        for t in truths
        if t["final_at"] is not None
        and (o := observations.get(str(t["messageId"]))) is not None
        and t["final_at"] <= o.started_at + deadline
    )
    return {
        "messages": n,
        "calls": calls,
        "calls_per_message": _r(calls / n if n else 0.0),
        "reported_polls": reported_polls,
        "peak_checks_per_s": max(per_second.values(), default=0),
        "detection_delay_s": _summary(delays),
        "final_before_deadline": final_in_time,
        "right": right,
        "wrong": wrong,
        "missing": missing,
        "borderline": borderline,
        "wrong_in_blind_window": blind,
        "outcomes": dict(sorted(outcomes.items())),
        "sources": dict(sorted(sources.items())),
        "examples": examples,
    }


def push_latency(
    truths: Iterable[Mapping[str, Any]], observations: Mapping[str, Observation]
) -> dict[str, Any]:
    """Webhook-to-callback latency: the final push's ``sent_at`` to the callback.

    Over messages whose outcome came from a push (``source == "push"``) and whose final push
    was answered 2xx and sent after the message's tracker was enqueued: a push that comes
    before anyone tracks the message cannot fire a callback (the tracker's first run finds
    the cached final status instead); those are counted as ``before_tracking`` and their
    figures kept apart under ``all``. A poll that won the race is counted as ``final_by_poll``.
    """
    tracked: list[float] = []
    every: list[float] = []
    early: list[float] = []  # pushed in the first PHASE_S of tracking: the start-up burst
    later: list[float] = []
    by_poll = before = 0
    for truth in truths:
        obs = observations.get(str(truth["messageId"]))
        final_status = truth["final_status"]
        if obs is None or obs.known_at is None or final_status is None:
            continue
        if obs.source != "push":
            by_poll += obs.outcome == final_status
            continue
        sent = [
            float(p["sent_at"])
            for p in truth["pushes"]
            if p["deliverystatus"] == final_status
            and isinstance(p.get("http_status"), int)
            and 200 <= p["http_status"] < 300
        ]
        if not sent:
            continue
        latency = obs.known_at - min(sent)
        every.append(latency)
        if min(sent) >= obs.started_at:
            tracked.append(latency)
            (early if min(sent) - obs.started_at < PHASE_S else later).append(latency)
        else:
            before += 1
    # Why each failed push failed: its HTTP status, or the sandbox's error (a timeout, a
    # connection the receiver closed).
    failures = Counter(
        str(p.get("http_status") or p.get("error"))
        for t in truths
        for p in t["pushes"]
        if not (isinstance(p.get("http_status"), int) and 200 <= p["http_status"] < 300)
    )
    return {
        **_summary(tracked),
        "before_tracking": before,
        "all": _summary(every),
        f"first_{PHASE_S:g}s": _summary(early),
        f"after_{PHASE_S:g}s": _summary(later),
        "final_by_poll": by_poll,
        "failed_pushes": sum(failures.values()),
        "push_failures": dict(sorted(failures.items())),
        "pushes": sum(len(t["pushes"]) for t in truths),
    }


def per_message(
    truths: Iterable[Mapping[str, Any]], observations: Mapping[str, Observation]
) -> dict[str, Any]:
    """One compact row per message, times in seconds after the mode began tracking it."""
    columns = [
        "messageId",
        "final_status",
        "final_after_s",
        "outcome",
        "known_after_s",
        "calls",
        "source",
    ]
    rows: list[list[Any]] = []
    for truth in truths:
        message_id = str(truth["messageId"])
        obs = observations.get(message_id)
        origin = obs.started_at if obs else float(truth["created_at"])
        final_at = truth["final_at"]
        rows.append(
            [
                message_id,
                truth["final_status"],
                None if final_at is None else round(final_at - origin, 3),
                obs.outcome if obs else "missing",
                None if obs is None or obs.known_at is None else round(obs.known_at - origin, 3),
                int(truth["polls"]),
                obs.source if obs else None,
            ]
        )
    return {"columns": columns, "rows": rows}
