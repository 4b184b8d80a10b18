"""A batch's after-step: what the rules decided, applied in one round trip (answers cached,
messages re-scored and counted, pushes noted, outcomes recorded once), then the callbacks of
the outcomes this tick recorded."""

from __future__ import annotations

import time
from collections.abc import Iterable

from smsbat_tracker import metrics
from smsbat_tracker.engine.campaign.callbacks import Callbacks, subscription_of
from smsbat_tracker.engine.campaign.report import compact, result_of
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import Answer, AwaitPush, Decision, Finish, Outcome, Wait
from smsbat_tracker.store.campaign_scripts import AfterBatch, Final
from smsbat_tracker.store.ratelimit import pause_for

__all__ = ["Recorder"]

log = get_logger(__name__)


class Recorder:
    """Applies a batch's decisions and sends the callbacks of what it recorded."""

    def __init__(self, engine: Engine, callbacks: Callbacks) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self._callbacks = callbacks
        self._after = AfterBatch(engine.redis)

    def record(
        self,
        campaign_id: str,
        meta: dict[str, str],
        decisions: dict[str, Decision],
        started_at: float,
        *,
        answers: dict[str, Answer] | None = None,
        chain: tuple[int, str] | None = None,
        pushed: Iterable[str] = (),
    ) -> tuple[int, int, float | None]:
        """Apply a batch's decisions in one round trip: cache the answers, re-score and
        count, note ``pushed`` (messages found pushed: trusted to be from then on, as a
        tracking's session notes it), record the outcomes (and send their callbacks),
        forget the chain's batch.

        Returns the outcomes recorded, how many messages are left due, and when the first
        of them is due.
        """
        now = time.time()
        finals: list[tuple[str, Outcome, MessageStatus | None, str | None]] = []
        rescore: dict[str, float] = {}
        counted: list[str] = []
        failed: list[str] = []
        for m, decision in decisions.items():
            if isinstance(decision, Finish):
                finals.append((m, decision.outcome, decision.status, decision.error))
            elif isinstance(decision, Wait | AwaitPush):
                rescore[m] = now + decision.seconds
            if isinstance(decision, Wait) and decision.counted:
                counted.append(m)
            elif isinstance(decision, Wait) and decision.failed:
                failed.append(m)
        statuses = {m: a for m, a in (answers or {}).items() if isinstance(a, MessageStatus)}
        pauses = [p for a in (answers or {}).values() if (p := pause_for(a)) is not None]
        sub = subscription_of(meta)
        stamp = str(int(now * 1000)) if sub else ""
        slot, run = chain if chain is not None else (None, "")
        reply = self._after(
            checks_key=self.keys.campaign_checks(campaign_id),
            due_key=self.keys.campaign_due(campaign_id),
            outcomes_key=self.keys.campaign_outcomes(campaign_id),
            meta_key=self.keys.campaign(campaign_id),
            unsent_key=self.keys.campaign_unsent(campaign_id),
            pause_key=self.engine.limiter.keys[1],
            claimed_key=self.keys.campaign_claimed(campaign_id, slot if slot is not None else -1),
            final_ttl_ms=int(self.settings.final_ttl * 1000),
            stamp=stamp,
            pause_ms=max(1, int(max(pauses) * 1000)) if pauses else None,
            chain_field=f"tick:{slot}" if chain is not None else "",
            run=run,
            stores={
                self.keys.status(m): self.engine.cache.store_args(answer, source="poll")
                for m, answer in statuses.items()
            },
            rescored=rescore,
            counted=counted,
            failed=failed,
            pushed=list(pushed),
            finals=[
                Final(m, outcome, compact(outcome, status, now - started_at))
                for m, outcome, status, _error in finals
            ],
        )
        if reply.paused:
            log.warning("ratelimit.pause", seconds=round(max(pauses), 3))
        recorded = set(reply.recorded)
        if recorded:
            counts = metrics.get().campaign_outcomes
            for m, outcome, _status, _error in finals:
                if m in recorded:
                    counts.labels(outcome).inc()
        if sub is not None and recorded:
            self._callbacks.send(
                campaign_id,
                sub,
                [
                    (m, result_of(campaign_id, m, outcome, status, error, started_at, now))
                    for m, outcome, status, error in finals
                    if m in recorded
                ],
                dict.fromkeys(recorded, stamp),
            )
        return len(recorded), reply.left, reply.first_due
