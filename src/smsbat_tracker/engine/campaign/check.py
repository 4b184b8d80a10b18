"""A claimed batch's check: the rules on what is known, one turn at the rate limit for the
messages to ask, each one's gate, then the rules on the answers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from smsbat_tracker import metrics
from smsbat_tracker.engine.campaign.fetch import BatchFetcher
from smsbat_tracker.engine.check import CHECK_WAIT
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.rules.decide import (
    Answer,
    Ask,
    Decision,
    Progress,
    TryLater,
    decide,
    line_position,
)
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.campaign_scripts import Turns
from smsbat_tracker.store.ratelimit import TICKET_GRACE

__all__ = ["BatchCheck", "parse_cached", "read_cached"]


def parse_cached(engine: Engine, ids: list[str], raws: Sequence[Any]) -> dict[str, CachedStatus]:
    """The cache entries read for ``ids`` (a damaged or missing one is left out)."""
    out = {}
    for m, raw in zip(ids, raws, strict=True):
        entry = engine.cache.parse(raw) if raw else None
        if entry is not None:
            out[m] = entry
    return out


def read_cached(engine: Engine, ids: list[str]) -> dict[str, CachedStatus]:
    """The cached statuses of ``ids``, in one round trip."""
    return parse_cached(engine, ids, engine.redis.mget([engine.keys.status(m) for m in ids]))


class BatchCheck:
    """Checks claimed batches: what the rules decide, asking the API where they say so."""

    def __init__(self, engine: Engine, fetcher: BatchFetcher) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self._fetcher = fetcher
        self._turns = Turns(engine.redis)

    def check(
        self,
        campaign_id: str,
        due: dict[str, float],
        cached: dict[str, CachedStatus],
        progress: dict[str, Progress],
        *,
        waiter: str,
        slot: int | None = None,
    ) -> tuple[int, float | None, dict[str, Decision], dict[str, Answer]]:
        """Check a claimed batch (``due``: each id's due time) for the tick chain ``slot``
        (None: a tick outside a chain, which holds no ticket).

        Returns the API calls made; when the rate limit has no turn for the batch yet, the
        seconds until it has (the messages to ask are then back in the due set); each
        message's decision; and the answers.
        """
        engine, settings = self.engine, self.settings
        limiter = engine.limiter
        rng = engine.rng.random
        now = time.time()
        decisions: dict[str, Decision] = {}
        to_call: list[str] = []
        for m in due:
            decision = decide(
                progress[m], cached=cached.get(m), now=now, rules=engine.rules, rng=rng
            )
            if isinstance(decision, Ask):
                to_call.append(m)
            else:
                decisions[m] = decision
        turn: float | None = None
        wait = 0.0
        answers: dict[str, Answer] = {}
        gated: list[str] = []
        if to_call:
            # One booking for the batch, in the limit's line by its oldest message: a batch
            # never holds a worker waiting behind older checks; it goes back in the due
            # set and its tick comes back when its turn comes (first in line, with its
            # tokens booked ahead: the chain's ticket). Then each message's gate,
            # the per-message minimum interval shared with track_message and get_status.
            booking = self._turns(
                rate_keys=limiter.keys,
                due_key=self.keys.campaign_due(campaign_id),
                gate_keys=[self.keys.poll_gate(m) for m in to_call],
                limited=limiter.enabled,
                gate_ms=int(settings.min_interval * 1000),
                reserve_args=limiter.script_args(
                    len(to_call),
                    # The batch's own pace, and no more: a tick does not sleep on a worker.
                    ahead=len(to_call) / limiter.rate + CHECK_WAIT if limiter.enabled else 0.0,
                    waiter=waiter,
                    due_at=min(line_position(progress[m], due_at=due[m], now=now) for m in to_call),
                ),
                messages=[(m, due[m]) for m in to_call],
                ticket_key="" if slot is None else self.keys.campaign_ticket(campaign_id, slot),
                ticket_grace=TICKET_GRACE,
            )
            wait = booking.wait_us / 1_000_000
            if not booking.booked:
                turn = wait
                metrics.get().rate_waits.labels("deferred").inc(len(to_call))
            elif wait > 0:
                metrics.get().rate_waits.labels("slept").inc(len(to_call))
            for m, ok in zip(to_call, booking.gates, strict=False):
                if ok:
                    gated.append(m)
                else:  # checked by someone else just now: look again shortly
                    answers[m] = TryLater(settings.min_interval)
        if gated:
            answers.update(self._fetcher.fetch(gated, wait))
        now = time.time()
        for m, answer in answers.items():
            decisions[m] = decide(
                progress[m],
                cached=cached.get(m),
                now=now,
                rules=engine.rules,
                answer=answer,
                rng=engine.rng.random,
            )
        return len(gated), turn, decisions, answers
