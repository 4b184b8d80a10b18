"""The campaign's records and report: a few dozen bytes per message, added up at the end.

Each message's outcome is kept as a compact record (:func:`compact`) in the campaign's
outcomes hash; :func:`build_report` adds them up into the delivery report, and
:func:`result_of` is a message's callback result (as ``track_message`` gives it).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from smsbat_tracker.engine.session import build_result, iso
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import Outcome

__all__ = ["build_report", "compact", "result_of"]


def result_of(
    campaign_id: str,
    message_id: str,
    outcome: Outcome,
    status: MessageStatus | None,
    error: str | None,
    started_at: float,
    now: float,
) -> dict[str, Any]:
    """A message's callback result, as ``track_message`` gives it (with the campaign)."""
    return build_result(
        message_id,
        outcome,
        status=status,
        started_at=started_at,
        polls=None,
        error=error,
        now=now,
        campaign_id=campaign_id,
    )


def _currency(status: MessageStatus) -> str:
    return status.billCurrency or status.rateCurrency or "unknown"


def _amount(status: MessageStatus) -> float:
    for value in (status.billAmount, status.cost):
        if value is not None:
            return float(value)
    return 0.0


def compact(outcome: str, status: MessageStatus | None, elapsed: float) -> str:
    """The per-message record: a few dozen bytes, enough for the report."""
    record: dict[str, Any] = {"o": outcome, "t": round(elapsed, 2)}
    if status is not None:
        record["s"] = status.deliverystatus
        record["c"] = _amount(status)
        record["cur"] = _currency(status)
        if status.fallbacks or status.extendedStatuses:
            record["x"] = 1
        if status.used_fallback:
            record["fb"] = 1
    return json.dumps(record, separators=(",", ":"))


def build_report(
    campaign_id: str,
    meta: dict[str, str],
    records: Iterable[tuple[str, str]],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivery report from the campaign hash and its compact outcome records (each
    with its message id); it lists the ids that failed and that timed out."""
    counts: Counter[str] = Counter()
    costs: dict[str, float] = defaultdict(float)
    times: list[float] = []
    failed: list[str] = []
    timed_out: list[str] = []
    extended = fallback = 0
    for message_id, raw in records:
        rec = json.loads(raw)
        counts[rec["o"]] += 1
        if rec["o"] == "timeout":
            timed_out.append(message_id)
        elif rec["o"] != "delivered":
            failed.append(message_id)
        if rec.get("c"):
            costs[rec.get("cur") or "unknown"] += float(rec["c"])
        if rec["o"] in ("delivered", "undeliverable", "permanenterror"):
            times.append(float(rec["t"]))
        extended += int(rec.get("x", 0))
        fallback += int(rec.get("fb", 0))
    total = int(meta.get("total", 0))
    pending = max(total - sum(counts.values()), 0)

    def pct(q: float) -> float | None:
        if not times:
            return None
        if len(times) == 1:
            return round(times[0], 2)
        return round(statistics.quantiles(times, n=100, method="inclusive")[int(q) - 1], 2)

    return {
        "campaign_id": campaign_id,
        "total": total,
        "finished": pending == 0 and meta.get("state") == "finished",
        "pending": pending,
        "outcomes": {
            k: counts.get(k, 0)
            for k in ("delivered", "undeliverable", "permanenterror", "timeout", "error")
        },
        "delivery_rate": round(counts.get("delivered", 0) / total, 4) if total else None,
        "cost": {cur: round(v, 6) for cur, v in sorted(costs.items())},
        "time_to_final_p50": pct(50),
        "time_to_final_p95": pct(95),
        "fallback": {"extended": extended, "used": fallback},
        # Undeliverable, permanent errors and errors; then the timeouts: what to send again.
        "failed_ids": sorted(failed),
        "timeout_ids": sorted(timed_out),
        "started_at": iso(float(meta["started_at"])) if "started_at" in meta else None,
        "deadline_at": iso(float(meta["deadline_at"])) if "deadline_at" in meta else None,
        "reported_at": iso(time.time() if now is None else now),
    }
