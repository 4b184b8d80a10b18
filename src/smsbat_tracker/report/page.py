"""A campaign's delivery report as one self-contained HTML page.

Everything is inside the file: the styles, and the charts as SVG data URIs, so the page
opens without a network and can be mailed or shared as it is. It has no script. Each
figure the report gives stands in an element with an ``id`` and its exact value in
``data-value`` (JSON), which is what the browser test compares with the report.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from html import escape
from typing import Any, Final

from smsbat_tracker.report import charts
from smsbat_tracker.report.figures import OUTCOMES, Figures, figures_of

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_POLICY", "render"]

# What a served page may load: its own styles and the charts' data URIs, nothing else.
PAGE_POLICY: Final = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)
# Served, the page also refuses to be framed (only a header can say so).
CONTENT_SECURITY_POLICY: Final = PAGE_POLICY + "; frame-ancestors 'none'"

_STYLE: Final = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #212121; margin: 0 auto; max-width: 60rem; padding: 1.5rem; }
h1 { font-size: 1.5rem; margin: 0 0 .2rem; } h2 { font-size: 1.15rem; margin: 2rem 0 .5rem; }
.muted { color: #616161; }
.tiles { display: flex; flex-wrap: wrap; gap: .75rem; margin: 1.2rem 0; }
.tile { border: 1px solid #e0e0e0; border-radius: 8px; padding: .6rem 1rem; min-width: 6.5rem; }
.tile .n { font-size: 1.6rem; font-weight: 600; } .tile .l { color: #616161; font-size: .85rem; }
table { border-collapse: collapse; } td, th { padding: .25rem .8rem .25rem 0; text-align: left; }
th { border-bottom: 1px solid #bdbdbd; font-weight: 600; } td.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafafa; }
.dot { display: inline-block; width: .7rem; height: .7rem; border-radius: 50%;
       margin-right: .4rem; vertical-align: baseline; }
img.chart { display: block; width: 100%; max-width: 42rem; height: auto; }
code { font-size: .9em; }
"""


def _value(element_id: str, value: Any, shown: str, tag: str = "span", cls: str = "") -> str:
    """An element showing ``shown``, with ``value`` in ``data-value`` (JSON)."""
    attrs = f' class="{cls}"' if cls else ""
    return (
        f'<{tag} id="{escape(element_id)}"{attrs} data-value="{escape(json.dumps(value))}">'
        f"{escape(shown)}</{tag}>"
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:g} s"


def _moment(iso: str) -> str:
    """``2026-12-03T19:46:00.949Z`` as ``2026-12-03 19:46:00 UTC``."""
    return iso[:19].replace("T", " ") + " UTC" if iso.endswith("Z") else iso


def _chart(element_id: str, svg: bytes, alt: str) -> str:
    data = base64.b64encode(svg).decode("ascii")
    return (
        f'<img class="chart" id="{element_id}" alt="{escape(alt)}" '
        f'src="data:image/svg+xml;base64,{data}">'
    )


def _tiles(report: dict[str, Any]) -> str:
    rate = report["delivery_rate"]
    tiles = [
        ("delivery-rate", rate, "—" if rate is None else f"{rate * 100:.1f} %", "delivery rate"),
        ("delivered", report["outcomes"]["delivered"], None, "delivered"),
        ("total", report["total"], None, "messages"),
        ("pending", report["pending"], None, "still tracked"),
        ("p50", report["time_to_final_p50"], _seconds(report["time_to_final_p50"]), "p50 to final"),
        ("p95", report["time_to_final_p95"], _seconds(report["time_to_final_p95"]), "p95 to final"),
    ]
    out = ['<div class="tiles">']
    for element_id, value, given, label in tiles:
        shown = f"{value:,}" if given is None else given
        out.append(
            f'<div class="tile">{_value(element_id, value, shown, "div", "n")}'
            f'<div class="l">{escape(label)}</div></div>'
        )
    out.append("</div>")
    return "".join(out)


def _outcomes(report: dict[str, Any]) -> str:
    total = report["total"] or 0
    rows = []
    for outcome in OUTCOMES:
        count = report["outcomes"].get(outcome, 0)
        share = f"{count * 100 / total:.1f} %" if total else "—"
        rows.append(
            f'<tr><td><span class="dot" style="background:{charts.COLOURS[outcome]}"></span>'
            f"{escape(outcome)}</td>"
            f'<td class="num">{_value(f"count-{outcome}", count, f"{count:,}")}</td>'
            f'<td class="num muted">{share}</td></tr>'
        )
    return (
        "<table><thead><tr><th>outcome</th><th>messages</th><th>share</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _cost(report: dict[str, Any], figures: Figures) -> str:
    costs: dict[str, float] = report["cost"]
    if not costs:
        return '<p class="muted" id="cost-none">The API gave no cost for these messages.</p>'
    rows = []
    for currency, amount in costs.items():
        label = "not given by the API" if currency == "unknown" else currency
        rows.append(
            f"<tr><td>{escape(label)}</td>"
            f'<td class="num">{_value(f"cost-{currency}", amount, f"{amount:,.4f}")}</td>'
            f'<td class="num">{figures.billed.get(currency, 0):,}</td></tr>'
        )
    return (
        "<table><thead><tr><th>currency</th><th>total</th><th>messages billed</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="muted">The billed amount (<code>billAmount</code>, '
        "<code>billCurrency</code>) where the API gave one, else <code>cost</code>.</p>"
    )


def _fallback(report: dict[str, Any]) -> str:
    used, extended = report["fallback"]["used"], report["fallback"]["extended"]
    return (
        f"<p>{_value('fallback-used', used, f'{used:,}')} messages went out by SMS after "
        f"Viber, of {_value('fallback-extended', extended, f'{extended:,}')} whose status "
        "carried the Viber→SMS chain.</p>"
    )


def _not_delivered(report: dict[str, Any], figures: Figures) -> str:
    """The report's failed ids, then its timed-out ids, with what their records add."""
    ids = [*report["failed_ids"], *report["timeout_ids"]]
    if not ids:
        return '<p class="muted" id="not-delivered-none">Every message was delivered.</p>'
    known = {row.message_id: row for row in figures.not_delivered}
    timed_out = set(report["timeout_ids"])
    rows = []
    for message_id in ids:
        row = known.get(message_id)
        outcome = row.outcome if row else "timeout" if message_id in timed_out else "failed"
        status = (row.last_status if row else None) or "—"
        seconds = f"{row.seconds:g}" if row else "—"
        rows.append(
            f'<tr data-outcome="{escape(outcome)}"><td><code>{escape(message_id)}</code></td>'
            f"<td>{escape(outcome)}</td><td>{escape(status)}</td>"
            f'<td class="num">{seconds}</td></tr>'
        )
    return (
        '<table id="not-delivered"><thead><tr><th>message id</th><th>outcome</th>'
        "<th>last status</th><th>seconds</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _records_note(report: dict[str, Any], figures: Figures) -> str:
    """A line when the charts stand on fewer records than the report counted (records
    expire with the campaign's final TTL; a report read back later may outlive them)."""
    counted = sum(report["outcomes"].values())
    if figures.records >= counted:
        return ""
    return (
        f'<p class="muted" id="records-note">The charts and the table\'s statuses come from '
        f"{figures.records:,} of the {counted:,} messages' records: the others have expired "
        "(SMSBAT_FINAL_TTL).</p>"
    )


def render(report: dict[str, Any], records: Iterable[tuple[str, str]]) -> str:
    """The page of a campaign's ``report`` (as ``get_campaign_report`` gives it) and its
    per-message ``records``.

    Raises :class:`~smsbat_tracker.errors.MissingExtra` without matplotlib, and
    :class:`ValueError` naming a message whose record cannot be read.
    """
    charts.require_matplotlib()
    figures = figures_of(records)
    campaign_id = str(report["campaign_id"])
    state = "finished" if report["finished"] else f"running: {report['pending']:,} still tracked"
    when = [
        f"{label} {_moment(report[key])}"
        for label, key in (
            ("sent", "started_at"),
            ("deadline", "deadline_at"),
            ("report of", "reported_at"),
        )
        if report.get(key)
    ]
    total = int(report["total"] or 0)
    body = [
        f"<h1>Campaign {_value('campaign-id', campaign_id, campaign_id)}</h1>",
        f'<p class="muted">{escape(" · ".join([state, *when]))}</p>',
        _tiles(report),
        _records_note(report, figures),
        "<h2>Outcomes</h2>",
        _outcomes(report),
        _chart("chart-outcomes", charts.outcome_counts(report["outcomes"]), "messages per outcome"),
        "<h2>Delivered over time</h2>",
        _chart(
            "chart-delivered",
            charts.delivered_over_time(figures, total),
            "messages delivered, cumulative, against time from the send",
        ),
        "<h2>Time to final status</h2>",
        _chart(
            "chart-time-to-final",
            charts.time_to_final(figures),
            "distribution of the time each message took to reach its final status",
        ),
        "<h2>Cost</h2>",
        _cost(report, figures),
        "<h2>Viber→SMS fallback</h2>",
        _fallback(report),
        "<h2>Not delivered</h2>",
        _not_delivered(report, figures),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{PAGE_POLICY}">'
        f"<title>Campaign {escape(campaign_id)}: delivery report</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
