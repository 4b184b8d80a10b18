"""What a campaign's page shows beyond its report, read from the per-message records.

Pure: the compact records (:func:`~smsbat_tracker.engine.campaign.report.compact`) in, the
series and rows out. The counts, rate, quantiles and costs on the page are the report's
own (:func:`~smsbat_tracker.engine.campaign.report.build_report`), never added up again
here, so the page and ``get_campaign_report`` cannot disagree.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["FINALS", "OUTCOMES", "Figures", "Row", "figures_of"]

# Every outcome a campaign message can end with, in the order the page shows them.
OUTCOMES: Final = ("delivered", "undeliverable", "permanenterror", "timeout", "error")
# The outcomes the provider gave (a time to final); timeout and error have none.
FINALS: Final = ("delivered", "undeliverable", "permanenterror")


@dataclass(frozen=True, slots=True)
class Row:
    """A message that was not delivered: its id, outcome and last status the API gave."""

    message_id: str
    outcome: str
    last_status: str | None
    seconds: float


@dataclass(slots=True)
class Figures:
    """The series behind the charts and the table of messages not delivered."""

    # Seconds from the send to each final status, per final outcome, sorted.
    times: dict[str, list[float]] = field(default_factory=lambda: {o: [] for o in FINALS})
    # Messages with a cost in each currency (the cost itself is the report's).
    billed: Counter[str] = field(default_factory=Counter)
    # The failed ones by id, then the timed-out ones by id (the report's order).
    not_delivered: list[Row] = field(default_factory=list)
    # How many records there were.
    records: int = 0

    @property
    def delivered_times(self) -> list[float]:
        """Seconds from the send to each delivery, sorted: the cumulative curve."""
        return self.times["delivered"]


def figures_of(records: Iterable[tuple[str, str]]) -> Figures:
    """The figures of a campaign's records (message id, compact record) in any order.

    Raises :class:`ValueError` naming the message whose record cannot be read.
    """
    figures = Figures()
    for message_id, raw in records:
        try:
            record = json.loads(raw)
            outcome, seconds = str(record["o"]), float(record["t"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"campaign record of message {message_id!r} is unreadable: {exc}"
            ) from None
        figures.records += 1
        if outcome in figures.times:
            figures.times[outcome].append(seconds)
        if record.get("c"):
            figures.billed[str(record.get("cur") or "unknown")] += 1
        if outcome != "delivered":
            status = record.get("s")
            figures.not_delivered.append(
                Row(message_id, outcome, None if status is None else str(status), seconds)
            )
    for series in figures.times.values():
        series.sort()
    # The report's order: the failed ones (undeliverable, permanent errors, errors) by id,
    # then the timed-out ones by id.
    figures.not_delivered.sort(key=lambda row: (row.outcome == "timeout", row.message_id))
    return figures
