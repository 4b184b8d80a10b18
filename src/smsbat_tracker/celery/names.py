"""The tracker's task names and message stamps: one home for every spelling of them."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DUE_AT",
    "DUE_INDEXED",
    "PUBLISHED_AT",
    "SETTLE_TASK",
    "TICK_TASK",
    "TRACKER_TASKS",
    "TRACK_CAMPAIGN_TASK",
    "TRACK_PRIORITY",
    "TRACK_TASK",
]

TRACK_TASK: Final = "smsbat_tracker.track_message"
SETTLE_TASK: Final = "smsbat_tracker.settle_message"
TRACK_CAMPAIGN_TASK: Final = "smsbat_tracker.track_campaign"
TICK_TASK: Final = "smsbat_tracker.campaign_tick"
# Every task of the tracker: routed to SMSBAT_QUEUE when it is set.
TRACKER_TASKS: Final = (TRACK_TASK, SETTLE_TASK, TRACK_CAMPAIGN_TASK, TICK_TASK)
# The tasks whose runs the due index covers (see smsbat_tracker.celery.redrive).
DUE_INDEXED: Final = frozenset({TRACK_TASK, TICK_TASK})
# Priority of tracking checks and campaign ticks on the Redis transport, where 0 is served
# first: settles and callbacks (no priority) go before a burst of new checks.
TRACK_PRIORITY: Final = 6
# Publish time stamped on the tracker's due-indexed tasks (the re-driver's queue age).
PUBLISHED_AT: Final = "smsbat_published_at"
# When a due-indexed task given back (or re-driven) after its ETA had passed fell due: the
# ETA moves to this header, so that the worker that fetches it counts it against its
# prefetch limit (Celery fetches a task with an ETA past that limit: a worker took every
# overdue run at once and fetched nothing else until its pool had worked through them),
# and the run keeps its place in the rate limit's line all the same.
DUE_AT: Final = "smsbat_due_at"
