"""Celery tasks of campaigns: :func:`track_campaign`, its ticks, and its report.

.. code-block:: python

    track_campaign.delay("black-friday", message_ids, deadline=600,
        on_report=store_campaign_report.s())
    get_campaign_report("black-friday")  # the final report, or the report so far

One call tracks many messages as one campaign: at most ``SMSBAT_CAMPAIGN_TICKS`` tick
chains check its due messages in batches, and ``on_report`` receives the delivery report
when every message is final or the deadline has passed. See
:mod:`smsbat_tracker.engine.campaign` for the design.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

from celery import Celery, current_app, shared_task

from smsbat_tracker import metrics
from smsbat_tracker.celery.names import TICK_TASK, TRACK_CAMPAIGN_TASK
from smsbat_tracker.celery.task_base import (
    CALLBACK_ARGS,
    AnyTask,
    NextRun,
    TrackerTask,
    as_signature_dict,
    broker_errors,
    check_known,
    rerun,
    stamp,
)
from smsbat_tracker.celery.tracker import Tracker, tracker_of
from smsbat_tracker.engine.campaign import validate_campaign_id
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import validate_message_id
from smsbat_tracker.rules.decide import campaign_first_tick_at

__all__ = ["campaign_tick", "get_campaign_report", "track_campaign"]

log = get_logger(__name__)

# Without a rate limit, a campaign tick works through due batches for this long before
# handing over (fewer task round trips at thousands of checks a second): short, so that a
# worker killed mid-tick loses little.
_TICK_BUDGET = 2.0


def tick_budget(*, limited: bool) -> float:
    """How long one campaign tick run works through due batches before it hands its
    worker process back.

    Under a rate limit, one batch (its chain's share of what the limit allows in
    ``CLAIM_SECONDS``): a batch's requests go out at the limit's pace, so a tick that
    looped would sleep out the pace on the process, and a campaign's chains would hold a
    worker's every process for seconds while its checks, and the callbacks of final
    messages, waited behind them.
    """
    return 0.0 if limited else _TICK_BUDGET


class CampaignTask(TrackerTask):
    """``track_campaign``'s enqueue: checks the arguments and registers the campaign.

    Bad ids never reach the broker. Every message's first check, and each tick chain's
    entry in the due index, are stored before the task is published, so that a lost task
    (a killed worker, a Redis restart) is re-driven instead of forgotten.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        campaign_id = validate_campaign_id(kwargs.get("campaign_id", args[0] if args else None))
        message_ids = kwargs.get("message_ids", args[1] if len(args) > 1 else None)
        if not isinstance(message_ids, list | tuple) or not message_ids:
            raise ValueError("message_ids must be a non-empty list of message ids")
        for message_id in message_ids:
            validate_message_id(message_id)
        for name in ("on_report", *CALLBACK_ARGS):
            sig = as_signature_dict(name, kwargs.get(name))
            if "enqueued_at" not in kwargs:
                check_known(self.app, name, sig)
        if "enqueued_at" not in kwargs:
            kwargs["enqueued_at"] = time.time()
            with broker_errors("track_campaign"):
                _register_campaign(
                    self.tracker,
                    campaign_id,
                    message_ids,
                    deadline=kwargs.get("deadline", args[2] if len(args) > 2 else None),
                    on_report=kwargs.get("on_report"),
                    on_delivered=kwargs.get("on_delivered"),
                    on_failed=kwargs.get("on_failed"),
                    on_timeout=kwargs.get("on_timeout"),
                    enqueued_at=kwargs["enqueued_at"],
                )
        return super().apply_async(args, kwargs, *rest, **options)


def _register_campaign(
    tracker: Tracker,
    campaign_id: str,
    message_ids: Sequence[str],
    *,
    deadline: float | None,
    on_report: Any,
    on_delivered: Any,
    on_failed: Any,
    on_timeout: Any,
    enqueued_at: float,
) -> bool:
    return tracker.campaigns.register(
        campaign_id,
        message_ids,
        deadline=deadline,
        subscription=Subscription(
            on_delivered=as_signature_dict("on_delivered", on_delivered),
            on_failed=as_signature_dict("on_failed", on_failed),
            on_timeout=as_signature_dict("on_timeout", on_timeout),
        ),
        on_report=as_signature_dict("on_report", on_report),
        enqueued_at=enqueued_at,
    )


@shared_task(bind=True, base=CampaignTask, name=TRACK_CAMPAIGN_TASK)
def track_campaign(
    self: AnyTask,
    campaign_id: str,
    message_ids: list[str],
    deadline: float | None = None,
    on_report: dict[str, Any] | None = None,
    on_delivered: dict[str, Any] | None = None,
    on_failed: dict[str, Any] | None = None,
    on_timeout: dict[str, Any] | None = None,
    enqueued_at: float | None = None,
) -> dict[str, Any]:
    """Track many messages as one campaign and report its delivery rate.

    ``on_report`` receives the report when every message is final or the deadline has
    passed; the per-message callbacks are optional. The report stays retrievable with
    :func:`get_campaign_report`. See :mod:`smsbat_tracker.engine.campaign` for the design.
    """
    tracker = tracker_of(self.app)
    runner = tracker.campaigns
    enqueued_at = enqueued_at if enqueued_at is not None else time.time()
    # Registered at enqueue, unless sent by name, or cut short: then registered here.
    _register_campaign(
        tracker,
        campaign_id,
        message_ids,
        deadline=deadline,
        on_report=on_report,
        on_delivered=on_delivered,
        on_failed=on_failed,
        on_timeout=on_timeout,
        enqueued_at=enqueued_at,
    )
    meta = runner.meta(campaign_id)
    if meta.get("started_at") != repr(enqueued_at):
        log.info("campaign.duplicate", campaign_id=campaign_id)
        return {"campaign_id": campaign_id, "started": False}
    total = len(set(message_ids))
    metrics.get().campaigns_started.inc()
    metrics.get().campaign_messages.inc(total)
    first = campaign_first_tick_at(runner.engine.rules, started_at=enqueued_at)
    for slot, run in runner.chains(campaign_id, meta).items():
        if run.endswith(":0"):  # a chain not started yet (a redelivery finds them started)
            campaign_tick.apply_async(
                (campaign_id,), {"slot": slot, "run": run}, countdown=first - time.time()
            )
    return {"campaign_id": campaign_id, "started": True, "total": total}


class TickTask(TrackerTask):
    """``campaign_tick``: each publish (the first, and every retry) is stamped."""

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        stamp(options)
        return super().apply_async(args, kwargs, *rest, **options)


@shared_task(bind=True, base=TickTask, name=TICK_TASK, max_retries=None)
def campaign_tick(
    self: AnyTask, campaign_id: str, slot: int | None = None, run: str | None = None
) -> dict[str, Any]:
    """Check the campaign's due messages for a few seconds, then schedule the next tick.

    Each tick holds one batch at a time and runs again as a retry of itself (one task id
    per chain in Flower, not one per tick): at most ``SMSBAT_CAMPAIGN_TICKS`` chains per
    campaign exist, whatever its size. A chain's ``run`` is its fencing token: a tick
    whose chain was re-driven stops at once.
    """
    runner = tracker_of(self.app).campaigns
    fenced = slot is not None and run is not None
    if fenced and not runner.holds(campaign_id, cast(int, slot), cast(str, run)):
        log.info("campaign.tick_superseded", campaign_id=campaign_id, slot=slot)
        return {"claimed": 0, "api_calls": 0, "recorded": 0, "superseded": True}
    until = time.monotonic() + tick_budget(limited=runner.engine.limiter.enabled)
    claimed = calls = recorded = 0
    while True:
        result = runner.tick(campaign_id, slot, run)
        claimed += result.claimed
        calls += result.api_calls
        recorded += result.recorded
        if result.finished or result.next_in is None:
            break
        if result.next_in > 0 or time.monotonic() > until:
            reason = NextRun(
                f"{claimed} checked, {recorded} final; next tick in {result.next_in:.1f} s"
            )
            if not fenced:
                raise rerun(self, args=(campaign_id,), countdown=result.next_in, exc=reason)
            following = runner.next_run(
                campaign_id, cast(int, slot), cast(str, run), time.time() + result.next_in
            )
            if following is not None:
                raise rerun(
                    self,
                    args=(campaign_id,),
                    kwargs={"slot": slot, "run": following},
                    countdown=result.next_in,
                    exc=reason,
                )
            break
    return {"claimed": claimed, "api_calls": calls, "recorded": recorded}


def get_campaign_report(campaign_id: str, *, app: Celery | None = None) -> dict[str, Any] | None:
    """The campaign's final report, or its report so far while it runs (None if unknown).

    ``app``: the Celery app whose tracker to use (default: the current app).
    """
    runner = tracker_of(app or current_app).campaigns
    validate_campaign_id(campaign_id)
    return runner.stored_report(campaign_id) or (
        runner.report(campaign_id) if runner.meta(campaign_id) else None
    )
