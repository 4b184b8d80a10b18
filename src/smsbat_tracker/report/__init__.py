"""A campaign's delivery report as a page people look at (``pip install
'smsbat-tracker[report]'``: matplotlib draws the charts).

- :func:`campaign_page`: the page of a campaign, read through a Celery app's tracker;
- :func:`render`: the page of a report and its per-message records, already read;
- :mod:`.figures`: the series and rows read from the records (pure);
- :mod:`.charts`: the SVG charts; :mod:`.page`: the HTML.

``smsbat-tracker campaign report ID --html report.html`` writes it; the webhook receiver
serves it at ``/campaigns/{id}`` behind ``SMSBAT_REPORT_PASSWORD``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smsbat_tracker.engine.campaign.registry import validate_campaign_id
from smsbat_tracker.engine.campaign.report import build_report
from smsbat_tracker.report.page import render

if TYPE_CHECKING:
    from celery import Celery

    from smsbat_tracker.engine.campaign.runner import CampaignRunner

__all__ = ["campaign_page", "page_of", "render"]


def page_of(runner: CampaignRunner, campaign_id: str) -> str | None:
    """The page of ``campaign_id`` through ``runner`` (None: no such campaign): its final
    report, or its report so far while it runs, as ``get_campaign_report`` gives it, with
    its records (read once: a running campaign's charts and counts are of one moment)."""
    # The final report first: once it is written, every record is.
    report = runner.stored_report(campaign_id)
    records = list(runner.records(campaign_id))
    if report is None:
        meta = runner.meta(campaign_id)
        if not meta:
            return None
        report = build_report(campaign_id, meta, records)
    return render(report, records)


def campaign_page(campaign_id: str, *, app: Celery | None = None) -> str | None:
    """The page of ``campaign_id`` (None: no such campaign), through ``app``'s tracker
    (default: the current app).

    Raises :class:`~smsbat_tracker.errors.InvalidMessageId` for an id that is not one,
    and :class:`~smsbat_tracker.errors.MissingExtra` without matplotlib.
    """
    from celery import current_app

    from smsbat_tracker.celery.tracker import tracker_of

    validate_campaign_id(campaign_id)
    return page_of(tracker_of(app or current_app).campaigns, campaign_id)
