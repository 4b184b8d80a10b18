"""A campaign's per-message callbacks: each sent once, by the tick that recorded its outcome,
or again by a later tick when that one died before it confirmed the send."""

from __future__ import annotations

import json
import time
from typing import Any

from smsbat_tracker.engine.campaign.check import read_cached
from smsbat_tracker.engine.campaign.report import result_of
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.campaign_scripts import TakeUnsent, TakeUnsentCode

__all__ = ["Callbacks", "subscription_of"]

log = get_logger(__name__)


def subscription_of(meta: dict[str, str]) -> Subscription | None:
    """The campaign's per-message callbacks (None when it has none)."""
    sub = Subscription.from_json(meta["subscription"]) if meta.get("subscription") else None
    return sub if sub is not None and not sub.is_empty else None


class Callbacks:
    """Sends per-message callbacks, each taken just before and confirmed just after."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self.redis = engine.redis
        self._take_unsent = TakeUnsent(self.redis)

    def send(
        self,
        campaign_id: str,
        sub: Subscription,
        results: list[tuple[str, dict[str, Any]]],
        stamps: dict[str, str],
        *,
        maybe_sent: bool = False,
    ) -> None:
        """Send per-message callbacks, each taken just before and confirmed just after.

        ``stamps`` holds each message's unsent stamp as this tick read it. A tick that
        stalled (a Redis outage) while another one took its callbacks over sends nothing
        twice but the one it was sending; one killed halfway leaves only what it did not
        confirm.
        """
        from celery import signature

        key = self.keys.campaign_unsent(campaign_id)
        for message_id, result in results:
            taken = self._take_unsent(
                unsent_key=key,
                message_id=message_id,
                stamp=stamps[message_id],
                new_stamp=int(time.time() * 1000),
            )
            if taken is not TakeUnsentCode.TAKEN:
                continue
            callback = sub.callback_for(str(result["outcome"]))
            if callback:
                sig = signature(callback, app=self.engine.app)
                task_id = self.keys.dispatch_id(campaign_id, message_id)
                # A re-send: the tick that took it may have sent it before it stopped.
                self.engine.send_once([(sig, task_id, {})], result, maybe_sent=maybe_sent)
            self.redis.hdel(key, message_id)

    def resend_unsent(self, campaign_id: str, meta: dict[str, str]) -> int:
        """Send again the callbacks a tick took and did not confirm in time (it died)."""
        key = self.keys.campaign_unsent(campaign_id)
        sub = subscription_of(meta)
        if sub is None or not self.redis.hlen(key):
            return 0
        now = time.time()
        stale = {
            str(m): str(at)
            for m, at in self.redis.hgetall(key).items()
            if now * 1000 - int(at) > self.settings.redrive_after * 1000
        }
        if not stale:
            return 0
        ids = list(stale)
        records = self.redis.hmget(self.keys.campaign_outcomes(campaign_id), ids)
        cached = read_cached(self.engine, ids)
        started_at = float(meta["started_at"])
        results = []
        for m, raw in zip(ids, records, strict=True):
            if raw is None:
                continue
            outcome = json.loads(raw)["o"]
            status = cached[m].status if m in cached else None
            results.append((m, result_of(campaign_id, m, outcome, status, None, started_at, now)))
        log.warning("campaign.resend", campaign_id=campaign_id, count=len(results))
        self.send(campaign_id, sub, results, stale, maybe_sent=True)
        return len(results)
