"""Keeping alive the due entries of the tracker tasks a live worker holds.

A tracking waiting for a busy pool, or a long check, is held by a live worker: each
second the worker scores its due entry *now* (when its token still matches), so that it
never looks overdue and is never re-driven from under it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis

from smsbat_tracker.celery.names import TICK_TASK, TRACK_TASK
from smsbat_tracker.celery.redrive.bounds import REFRESH_CHUNK, chunked
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.redrive_scripts import HeldEntry, RefreshHeld

__all__ = ["Refresher", "held_entry"]


def held_entry(request: Any, keys: Keys) -> HeldEntry | None:
    """The due entry and token of a tracker request held by this worker (None for any
    other task)."""
    args = list(request.args or ())
    kwargs = dict(request.kwargs or {})
    if request.name == TRACK_TASK:
        message_id = kwargs.get("message_id", args[0] if args else None)
        if not isinstance(message_id, str):
            return None
        retries = int(request.request_dict.get("retries") or 0)
        return HeldEntry(
            member=Keys.due_message(message_id),
            hash_key=keys.session(message_id),
            field="owner",
            token=str(request.id),
            run=str(retries),
        )
    if request.name == TICK_TASK:
        campaign_id = kwargs.get("campaign_id", args[0] if args else None)
        slot, run = kwargs.get("slot"), kwargs.get("run")
        if not isinstance(campaign_id, str) or slot is None or not isinstance(run, str):
            return None
        return HeldEntry(
            member=Keys.due_tick(campaign_id, int(slot)),
            hash_key=keys.campaign(campaign_id),
            field=f"tick:{slot}",
            token=run,
            run="",
        )
    return None


class Refresher:
    """Marks the due entries of held tracker requests alive."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._refresh = RefreshHeld(client)

    def refresh(self, requests: Iterable[Any]) -> int:
        """Mark the due entries of ``requests`` alive now; returns how many were overdue."""
        entries: dict[str, HeldEntry] = {}
        for request in requests:
            entry = held_entry(request, self.keys)
            if entry is not None:
                entries[entry.member] = entry
        now = time.time()
        due = self.keys.due()
        return sum(
            self._refresh(due, now, chunk) for chunk in chunked(entries.values(), REFRESH_CHUNK)
        )
