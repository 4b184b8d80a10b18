"""Campaigns: following thousands of messages with memory that does not grow with them.

One countdown task per message does not scale on Redis: a worker holds every ETA task in
memory until it is due (about 11 KB each), ignores the prefetch limit for them, and
redelivers those that outlive the visibility timeout. A campaign instead keeps each
message's next check time in a Redis sorted set, and a few short *tick* tasks claim the
due messages in batches, check them concurrently (cache first, then the API through the
global rate limit and the per-message 1 s gate), and re-score the rest. A worker holds at
most one batch per tick in memory, whatever the campaign's size.

Each message's outcome is recorded once (HSETNX in a Lua script); only the tick that
records it dispatches that message's callback. The report is written once (SET NX) and
``on_report`` is claimed once.

Durability: the campaign is registered (every message in its due set) when it is enqueued.
Each tick chain ``slot`` carries a fencing token ``run`` and has an entry in the due index
(:mod:`smsbat_tracker.celery.redrive`): a chain lost with a killed worker or a Redis restart is
re-driven, and the new chain first puts back the batch the lost one had claimed. A
recorded outcome whose callback (or the report) was claimed but never confirmed is sent
again by the next tick once the claim is as old as ``SMSBAT_REDRIVE_AFTER``; the chain
leaves the due index only when everything is sent.

The modules: :mod:`.registry` (registering, the campaign hash, the tick chains),
:mod:`.runner` (:class:`CampaignRunner`, a tick), :mod:`.check` (a batch's check: the
rules, the turn, the gates), :mod:`.fetch` (the batch's concurrent requests),
:mod:`.record` (a batch's after-step), :mod:`.callbacks` (per-message callbacks, sent
once), :mod:`.finish` (the end and the report's dispatch), :mod:`.report` (the report and
the per-message records). Their Lua scripts are ``store/lua/campaign_*.lua``.
"""

from __future__ import annotations

from smsbat_tracker.engine.campaign.registry import validate_campaign_id
from smsbat_tracker.engine.campaign.report import build_report
from smsbat_tracker.engine.campaign.runner import CampaignRunner, TickResult

__all__ = ["CampaignRunner", "TickResult", "build_report", "validate_campaign_id"]
