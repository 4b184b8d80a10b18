"""A campaign's end: what is left decided as at the deadline, the report written once, and
``on_report`` dispatched once before the tick chains leave the due index."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from typing import Any

from smsbat_tracker import metrics
from smsbat_tracker.engine.campaign.callbacks import Callbacks
from smsbat_tracker.engine.campaign.check import read_cached
from smsbat_tracker.engine.campaign.record import Recorder
from smsbat_tracker.engine.campaign.registry import Registry
from smsbat_tracker.engine.campaign.report import build_report
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.log import get_logger
from smsbat_tracker.rules.decide import Decision, expire
from smsbat_tracker.store.campaign_scripts import ClaimReport, ClaimReportCode
from smsbat_tracker.store.keys import Keys

__all__ = ["Finisher"]

log = get_logger(__name__)


class Finisher:
    """Ends campaigns and reads their reports."""

    def __init__(
        self, engine: Engine, registry: Registry, recorder: Recorder, callbacks: Callbacks
    ) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self.redis = engine.redis
        self._registry = registry
        self._recorder = recorder
        self._callbacks = callbacks
        self._claim_report = ClaimReport(self.redis)

    def finish(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Time out what is left, write the report once, and dispatch ``on_report``."""
        meta = meta or self._registry.meta(campaign_id)
        if not meta:
            return None
        due_key = self.keys.campaign_due(campaign_id)
        started_at = float(meta["started_at"])
        while True:
            left = [str(m) for m in self.redis.zrange(due_key, 0, 999)]
            if not left:
                break
            cached = read_cached(self.engine, left)
            expired: dict[str, Decision] = {m: expire(cached.get(m)) for m in left}
            self._recorder.record(campaign_id, meta, expired, started_at)
            self.redis.zrem(due_key, *left)  # recorded earlier by another tick: drop anyway
        self.redis.hset(self.keys.campaign(campaign_id), "state", "finished")
        meta = self._registry.meta(campaign_id)
        self._callbacks.resend_unsent(campaign_id, meta)
        report = self.report(campaign_id, meta)
        written = self.redis.set(
            self.keys.campaign_report(campaign_id),
            json.dumps(report),
            nx=True,
            px=int(self.settings.final_ttl * 1000),
        )
        if written:
            metrics.get().campaigns_finished.inc()
            log.info(
                "campaign.report",
                campaign_id=campaign_id,
                total=report["total"],
                delivery_rate=report["delivery_rate"],
                outcomes=report["outcomes"],
            )
            self.redis.delete(self.keys.campaign_checks(campaign_id))
        else:
            report = self.stored_report(campaign_id) or report
        self.dispatch_report(campaign_id, meta, report)
        return report

    def dispatch_report(
        self, campaign_id: str, meta: dict[str, str], report: dict[str, Any]
    ) -> None:
        """Send ``on_report`` once, then let the chains leave the due index."""
        claim_report = functools.partial(
            self._claim_report,
            meta_key=self.keys.campaign(campaign_id),
            unsent_key=self.keys.campaign_unsent(campaign_id),
            due_index=self.keys.due(),
            now_ms=int(time.time() * 1000),
            stale_ms=int(self.settings.redrive_after * 1000),
            members=[
                Keys.due_tick(campaign_id, slot)
                for slot in self._registry.chains(campaign_id, meta)
            ],
        )
        claim = claim_report()
        if claim not in (ClaimReportCode.CLAIMED, ClaimReportCode.RECLAIMED):
            return
        on_report = json.loads(meta["on_report"]) if meta.get("on_report") else None
        if on_report:
            from celery import signature

            sig = signature(on_report, app=self.engine.app)
            task_id = self.keys.dispatch_id(campaign_id, "report")
            self.engine.send_once(
                [(sig, task_id, {})], report, maybe_sent=claim is ClaimReportCode.RECLAIMED
            )
        self.redis.hset(self.keys.campaign(campaign_id), "report_sent", "sent")
        claim_report()  # sent: the chains leave the due index unless a callback is unsent

    def report(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any]:
        """The report as of now (partial while the campaign runs)."""
        meta = meta if meta is not None else self._registry.meta(campaign_id)
        return build_report(campaign_id, meta, self.records(campaign_id))

    def records(self, campaign_id: str) -> Iterator[tuple[str, str]]:
        """Each recorded message's id and compact record (see
        :func:`~smsbat_tracker.engine.campaign.report.compact`), in no order."""
        records = self.redis.hscan_iter(self.keys.campaign_outcomes(campaign_id), count=2_000)
        return ((str(k), str(v)) for k, v in records)

    def stored_report(self, campaign_id: str) -> dict[str, Any] | None:
        """The final report, once written."""
        raw = self.redis.get(self.keys.campaign_report(campaign_id))
        return json.loads(raw) if raw else None

    def progress(self, campaign_id: str) -> dict[str, int]:
        """Totals for a progress display: total, done, and counts per outcome."""
        meta = self._registry.meta(campaign_id)
        out = {"total": int(meta.get("total", 0)), "done": int(meta.get("done", 0))}
        for key, value in meta.items():
            if key.startswith("n:"):
                out[key[2:]] = int(value)
        return out
