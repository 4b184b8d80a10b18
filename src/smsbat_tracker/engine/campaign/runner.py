"""The campaign runner: one object per process that the tasks, the CLI and the worker call,
and a tick (claim a batch, check it, record it; maybe finish) built from the modules beside
it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from smsbat_tracker.engine.campaign.callbacks import Callbacks
from smsbat_tracker.engine.campaign.check import BatchCheck, parse_cached
from smsbat_tracker.engine.campaign.fetch import BatchFetcher
from smsbat_tracker.engine.campaign.finish import Finisher
from smsbat_tracker.engine.campaign.record import Recorder
from smsbat_tracker.engine.campaign.registry import Registry
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.rules.decide import AwaitPush, Progress, campaign_over
from smsbat_tracker.store.campaign_scripts import Claim

__all__ = ["CLAIM_SECONDS", "LEASE_SECONDS", "CampaignRunner", "TickResult"]

# Claimed messages come back to the due set after this if their tick is slow (a lost
# tick's batch is put back at once when its chain is re-driven).
LEASE_SECONDS: Final = 60.0
# Under a rate limit, the campaign's chains together claim what the limit lets them check
# in this many seconds. Each chain books its batch in one go (its ticket, when first in
# line) and comes back through the queue for the next: with 1 s, four chains whose round
# trips took a second or more in a busy worker got less than their turn, and a campaign's
# first checks fell 3-4 s behind the trackings' second ones in crash runs.
CLAIM_SECONDS: Final = 2.0


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did."""

    claimed: int
    api_calls: int
    recorded: int
    finished: bool
    next_in: float | None


class CampaignRunner:
    """Campaign operations for one process, on top of the tracking :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self.redis = engine.redis
        self._registry = Registry(engine)
        self._fetcher = BatchFetcher(engine)
        self._check = BatchCheck(engine, self._fetcher)
        self._callbacks = Callbacks(engine)
        self._recorder = Recorder(engine, self._callbacks)
        self._finisher = Finisher(engine, self._registry, self._recorder, self._callbacks)
        self._claim = Claim(self.redis)

    # --- the campaign hash and its chains (registry) --------------------------------------

    def register(
        self,
        campaign_id: str,
        message_ids: Sequence[str],
        *,
        deadline: float | None,
        subscription: Subscription,
        on_report: dict[str, Any] | None,
        enqueued_at: float,
    ) -> bool:
        """Register the campaign: every first check, and one due entry per tick chain.

        False when the campaign exists already. A registration cut short (its caller died
        halfway) is finished by the next call for the same campaign, which returns True.
        """
        return self._registry.register(
            campaign_id,
            message_ids,
            deadline=deadline,
            subscription=subscription,
            on_report=on_report,
            enqueued_at=enqueued_at,
        )

    def chains(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[int, str]:
        """Each tick chain's slot and its current run (the fencing token).

        ``meta``: the campaign hash, when the caller has just read it.
        """
        return self._registry.chains(campaign_id, meta)

    def holds(self, campaign_id: str, slot: int, run: str) -> bool:
        """True while ``run`` is the chain ``slot``'s current run."""
        return self._registry.holds(campaign_id, slot, run)

    def next_run(self, campaign_id: str, slot: int, run: str, next_at: float) -> str | None:
        """Move the chain on to its next run, due at ``next_at``; None when taken over."""
        return self._registry.next_run(campaign_id, slot, run, next_at)

    def meta(self, campaign_id: str) -> dict[str, str]:
        """The campaign hash (empty when unknown)."""
        return self._registry.meta(campaign_id)

    # --- ticking --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the batch client and its loop."""
        self._fetcher.close()

    def tick(self, campaign_id: str, slot: int | None = None, run: str | None = None) -> TickResult:
        """Claim one batch of due messages, check it, record and re-score; maybe finish.

        ``slot`` and ``run`` name the tick chain and its run: the claimed batch is noted so
        that a re-driven chain can put it back, and a run taken over claims nothing more.
        """
        meta = self.meta(campaign_id)
        if not meta or meta.get("state") == "registering":
            return TickResult(0, 0, 0, not meta, None if not meta else self.settings.max_delay)
        if meta.get("state") == "finished":
            # Finished before: send whatever a crash left unsent, then leave the due index.
            self.resend_unsent(campaign_id, meta)
            report = self.stored_report(campaign_id)
            if report is None:
                self.finish(campaign_id, meta)
            else:
                self._finisher.dispatch_report(campaign_id, meta, report)
            return TickResult(0, 0, 0, True, None)
        self.resend_unsent(campaign_id, meta)
        now = time.time()
        started_at = float(meta["started_at"])
        deadline_at = float(meta["deadline_at"])
        # Past the deadline check's grace and one more tick: what is left is decided now.
        if campaign_over(self.engine.rules, deadline_at=deadline_at, now=now):
            self.finish(campaign_id, meta)
            return TickResult(0, 0, 0, True, None)

        batch = self.settings.campaign_batch
        limiter = self.engine.limiter
        if limiter.enabled:
            # No more than the rate limit lets this tick check in CLAIM_SECONDS: a batch
            # that waits long for tokens holds its messages from the other chains, and a
            # tick killed meanwhile takes them down with it until its chain is re-driven.
            share = limiter.rate * CLAIM_SECONDS / self.settings.campaign_ticks
            batch = max(1, min(batch, int(share)))
        lease = LEASE_SECONDS + (batch / limiter.rate if limiter.enabled else 0)
        chain: tuple[int, str] | None = None
        chain_field, chain_run, chain_slot = "", "", -1  # no chain: nothing noted or fenced
        if slot is not None and run is not None:
            chain = (slot, run)
            chain_slot, chain_run, chain_field = slot, run, f"tick:{slot}"
        # Round trip one: claim the batch, with what the rules need of each message.
        head, tail = self.keys.status("\0").split("\0")
        claimed = self._claim(
            due_key=self.keys.campaign_due(campaign_id),
            checks_key=self.keys.campaign_checks(campaign_id),
            claimed_key=self.keys.campaign_claimed(campaign_id, chain_slot),
            meta_key=self.keys.campaign(campaign_id),
            now=now,
            limit=batch,
            lease_until=now + lease,
            status_head=head,
            status_tail=tail,
            chain_field=chain_field,
            run=chain_run,
        )
        due = {c.message_id: c.due_at for c in claimed}
        cached = parse_cached(self.engine, list(due), [c.cached for c in claimed])
        progress = {
            c.message_id: Progress(
                started_at, deadline_at, c.checks, pushed=c.pushed, failures=c.failures
            )
            for c in claimed
        }
        api_calls, turn, decisions, answers = self._check.check(
            campaign_id, due, cached, progress, waiter=f"c:{campaign_id}:{slot}", slot=slot
        )
        # A message the rules found pushed stays trusted to be pushed once its cache entry
        # expires, as a tracking's session keeps it (noted in round trip two).
        pushed = [
            m
            for m, decision in decisions.items()
            if isinstance(decision, AwaitPush) and not progress[m].pushed
        ]
        # Round trip two: cache, count, re-score, record.
        recorded, left, first = self._recorder.record(
            campaign_id, meta, decisions, started_at, answers=answers, chain=chain, pushed=pushed
        )
        if campaign_over(self.engine.rules, deadline_at=deadline_at, now=now, left=left):
            self.finish(campaign_id, meta)
            return TickResult(len(due), api_calls, recorded, True, None)
        next_in = max(0.0, first - time.time()) if first is not None else 0.0
        if turn is not None:
            next_in = max(next_in, turn)
        return TickResult(
            len(due), api_calls, recorded, False, min(next_in, self.settings.max_delay)
        )

    def resend_unsent(self, campaign_id: str, meta: dict[str, str]) -> int:
        """Send again the callbacks a tick took and did not confirm in time (it died)."""
        return self._callbacks.resend_unsent(campaign_id, meta)

    # --- finishing and reading (finish) ---------------------------------------------------

    def finish(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Time out what is left, write the report once, and dispatch ``on_report``."""
        return self._finisher.finish(campaign_id, meta)

    def report(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any]:
        """The report as of now (partial while the campaign runs)."""
        return self._finisher.report(campaign_id, meta)

    def stored_report(self, campaign_id: str) -> dict[str, Any] | None:
        """The final report, once written."""
        return self._finisher.stored_report(campaign_id)

    def records(self, campaign_id: str) -> Iterator[tuple[str, str]]:
        """Each recorded message's id and compact record, in no order."""
        return self._finisher.records(campaign_id)

    def progress(self, campaign_id: str) -> dict[str, int]:
        """Totals for a progress display: total, done, and counts per outcome."""
        return self._finisher.progress(campaign_id)
