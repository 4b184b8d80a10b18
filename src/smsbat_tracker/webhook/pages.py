"""``GET /campaigns/{id}``: a campaign's delivery report page, for people with the login.

Off until ``SMSBAT_REPORT_PASSWORD`` is set (404). Behind HTTP Basic: a caller without the
login gets 401 whatever the id, known or not, so an anonymous caller learns nothing about
which campaigns exist; no route lists them. The page is the one
``smsbat-tracker campaign report ID --html`` writes (:mod:`smsbat_tracker.report`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.campaign.registry import validate_campaign_id
from smsbat_tracker.engine.campaign.runner import CampaignRunner
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.errors import InvalidMessageId, MissingExtra
from smsbat_tracker.log import get_logger
from smsbat_tracker.report import page_of
from smsbat_tracker.report.page import CONTENT_SECURITY_POLICY
from smsbat_tracker.webhook.auth import REPORT_REALM, carries_login, report_login

__all__ = ["CampaignPages"]

log = get_logger(__name__)

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",  # a report of a running campaign changes; and it is private
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class CampaignPages:
    """The campaign pages' handler, reading through the receiver's engine."""

    def __init__(
        self,
        settings: Settings,
        engine: Callable[[], Engine],
        unavailable: tuple[type[BaseException], ...],
        runner: Callable[[], CampaignRunner | None] = lambda: None,
    ) -> None:
        self._login = report_login(settings)
        self._engine = engine
        self._shared_runner = runner
        self._unavailable = unavailable
        self._lock = threading.Lock()
        self._runners: dict[int, CampaignRunner] = {}

    @property
    def enabled(self) -> bool:
        """Whether the pages are served (``SMSBAT_REPORT_PASSWORD`` is set)."""
        return self._login is not None

    def runner(self) -> CampaignRunner:
        """The tracker's campaign runner when the receiver shares its engine, else one on
        the receiver's engine (built once per engine)."""
        shared = self._shared_runner()
        if shared is not None:
            return shared
        engine = self._engine()
        with self._lock:
            runner = self._runners.get(id(engine))
            if runner is None or runner.engine is not engine:
                runner = self._runners[id(engine)] = CampaignRunner(engine)
            return runner

    def page(self, campaign_id: str) -> str | None:
        """The page (blocking: Redis, then matplotlib)."""
        return page_of(self.runner(), campaign_id)

    async def campaign(self, request: Request) -> Response:
        """``GET /campaigns/{campaign_id}``."""
        if self._login is None:
            return JSONResponse({"error": "not found", "field": None}, 404)
        if not carries_login(request, self._login):
            return JSONResponse(
                {"error": "unauthorized"},
                401,
                headers={"WWW-Authenticate": f'Basic realm="{REPORT_REALM}", charset="UTF-8"'},
            )
        campaign_id = request.path_params["campaign_id"]
        try:
            validate_campaign_id(campaign_id)
        except InvalidMessageId as exc:
            return JSONResponse({"error": str(exc), "field": "campaign_id"}, 400)
        try:
            page = await run_in_threadpool(self.page, campaign_id)
        except MissingExtra as exc:
            return JSONResponse({"error": str(exc), "field": None}, 501)
        except self._unavailable as exc:
            log.warning("report.unavailable", campaign_id=campaign_id, error=type(exc).__name__)
            return JSONResponse(
                {"error": "unavailable", "field": None}, 503, headers={"Retry-After": "5"}
            )
        if page is None:
            return JSONResponse({"error": "no such campaign", "field": "campaign_id"}, 404)
        log.info("report.page", campaign_id=campaign_id, size=len(page))
        return HTMLResponse(page, headers=_PAGE_HEADERS)
