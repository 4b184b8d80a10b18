"""Ending a tracking exactly once: record the outcome, claim the callbacks, dispatch them.

The outcome is written once (SET NX semantics) by the after-check script, which in the same
round trip claims every subscription not yet dispatched. Only the caller that claims a
subscription dispatches its callback, so a duplicate enqueue, a redelivered task or a
webhook racing the poller never fires a callback twice. Once the outcome is recorded and
every subscription dispatched, the tracking is cut back to the outcome alone
(``store/lua/lib/forget.lua``): the result with the final status, and the ids of the
subscriptions it served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from smsbat_tracker import metrics
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.check import Check, Checks
from smsbat_tracker.engine.dispatch import Dispatcher
from smsbat_tracker.engine.session import SettleResult, Subscription
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.session_scripts import Settle

__all__ = ["Settler"]

log = get_logger(__name__)


class Settler:
    """Records outcomes and hands the claimed callbacks to the dispatcher."""

    def __init__(self, settings: Settings, checks: Checks, dispatcher: Dispatcher) -> None:
        self._settings = settings
        self._checks = checks
        self._dispatcher = dispatcher

    def settle(
        self,
        message_id: str,
        result: Mapping[str, Any] | None,
        *,
        claimer: str,
        check: Check | None = None,
    ) -> SettleResult:
        """Record ``result`` unless an outcome is recorded; claim and dispatch callbacks.

        With ``result=None`` nothing new is recorded: only pending subscriptions of an
        already recorded outcome are claimed (a late joiner, or a dispatch to finish).
        A run that ends its tracking writes its ``check`` in the same round trip.
        """
        step = Settle(
            result_json=json.dumps(result, separators=(",", ":")) if result is not None else "",
            outcome_ttl_ms=int(self._settings.final_ttl * 1000),
            claimer=claimer,
            now_ms=int(time.time() * 1000),
            # A claim this old belongs to a claimer that died: as late as a lost run.
            stale_ms=int(self._settings.redrive_after * 1000),
        )
        reply = self._checks.after(message_id, check, step).settled
        assert reply is not None  # the settle step always replies
        if not reply.outcome:  # result None and nothing recorded: nothing to do
            return SettleResult(False, {}, [])
        final: dict[str, Any] = json.loads(reply.outcome)
        claimed = [(sub_id, Subscription.from_json(raw)) for sub_id, raw in reply.claimed]
        settled = SettleResult(reply.recorded, final, claimed, reply.retaken)
        if settled.recorded:
            metrics.get().outcome(final, now=time.time())
            log.info(
                "track.final",
                message_id=message_id,
                outcome=final["outcome"],
                deliverystatus=final.get("deliverystatus"),
                polls=final.get("polls"),
            )
        self._dispatcher.dispatch(message_id, settled, claimer=claimer)
        return settled
