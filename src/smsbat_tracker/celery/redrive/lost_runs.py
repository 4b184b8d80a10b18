"""Re-driving the trackings and tick chains whose run was lost, from the due index.

An entry overdue by more than ``SMSBAT_REDRIVE_AFTER`` is neither held by a live worker
(it would be refreshed, see :mod:`.alive`) nor waiting in the broker queue (see
:meth:`LostRuns.queue_age`), so its run was lost. It is taken over with a new token and a
fresh run is published, at most :data:`SWEEP_LIMIT` a sweep, with the arguments the lost one
had. The lost task, should it ever come back, finds its token moved and stops without an
API call or a callback; meanwhile Flower would show it STARTED or RETRY for good (its worker
died, or its run lost Redis), so the sweep sends the event that ends it: succeeded, with
the result a superseded run returns, naming the run that took over.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from smsbat_tracker.celery.names import (
    DUE_AT,
    PUBLISHED_AT,
    TICK_TASK,
    TRACK_PRIORITY,
    TRACK_TASK,
)
from smsbat_tracker.celery.redrive.bounds import RELEASE_CHUNK, SWEEP_LIMIT
from smsbat_tracker.engine.broker import routed_queue
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys, kombu_queue_list
from smsbat_tracker.store.redrive_scripts import ReleaseBatch, Take, TakeChain, TakeSession

__all__ = ["LostRuns"]

log = get_logger(__name__)


class LostRuns:
    """Takes lost trackings and tick chains over and publishes their fresh runs."""

    def __init__(self, app: Any, client: redis.Redis, keys: Keys) -> None:
        self.app = app
        self.redis = client
        self.keys = keys
        self._take_session = TakeSession(client)
        self._take_chain = TakeChain(client)
        self._release_batch = ReleaseBatch(client)
        # Lost runs taken over since the last events were sent: (task id, its result).
        self._superseded: list[tuple[str, dict[str, str]]] = []

    def queues(self) -> list[str]:
        """The broker lists the tracker's due-tracked tasks wait in (their priority's)."""
        name, route = routed_queue(self.app, TRACK_TASK)
        return [kombu_queue_list(name, int(route.get("priority") or TRACK_PRIORITY))]

    def queue_age(self, now: float) -> float:
        """How long the oldest tracker task waiting in the broker has waited (0: none).

        kombu pushes on the left of a list and workers pop from the right, so the right
        end is the oldest. A tracking overdue by less than this may be waiting behind a
        backlog that live workers are draining, so the sweep leaves it alone.
        """
        age = 0.0
        for queue in self.queues():
            raw = self.redis.lindex(queue, -1)
            if not raw:
                continue
            try:
                published = float(json.loads(raw)["headers"][PUBLISHED_AT])
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours (or an older version's): no age to read
            age = max(age, now - published)
        return age

    def sweep(self, cutoff: float, now: float) -> int:
        """Re-drive the entries due before ``cutoff``, the oldest :data:`SWEEP_LIMIT` at
        most; returns how many were re-driven."""
        members = self.redis.zrangebyscore(
            self.keys.due(), "-inf", repr(cutoff), start=0, num=SWEEP_LIMIT
        )
        count = 0
        for member in members:
            count += self.redrive(str(member), cutoff, now)
        self._end_superseded()
        if members:
            log.warning(
                "redrive.sweep", overdue=len(members), redriven=count, cutoff=round(cutoff, 3)
            )
        return count

    def redrive(self, member: str, cutoff: float, now: float) -> int:
        """Take one overdue tracking over and publish its fresh run; 1 if it was re-driven."""
        kind, _, rest = member.partition(":")
        if kind == "m":
            return self._redrive_session(member, rest, cutoff, now)
        if kind == "c":
            campaign_id, _, slot_text = rest.rpartition(":")
            return self._redrive_chain(member, campaign_id, int(slot_text), cutoff, now)
        self.redis.zrem(self.keys.due(), member)  # not a member this version writes
        return 0

    def _redrive_session(self, member: str, message_id: str, cutoff: float, now: float) -> int:
        owner = uuid.uuid4().hex
        taken = self._take_session(
            due=self.keys.due(),
            session=self.keys.session(message_id),
            member=member,
            cutoff=cutoff,
            owner=owner,
            now=now,
        )
        if taken.result != Take.TAKEN:
            return 0
        # The fresh run carries the lost run's due time (past: it runs now), so it keeps its
        # place in the rate limit's line instead of joining the back of it. In a header, not
        # as its ETA: see DUE_AT.
        headers: dict[str, Any] = {PUBLISHED_AT: time.time()}
        if taken.due_at is not None:
            headers[DUE_AT] = min(taken.due_at, now)
        self.app.send_task(
            TRACK_TASK,
            args=(message_id,),  # as track_message.delay(message_id, ...) sent it
            kwargs={
                "deadline": taken.deadline_at - taken.started_at,
                "enqueued_at": taken.started_at,
            },
            task_id=owner,
            headers=headers,
        )
        log.warning("redrive.message", message_id=message_id, task_id=owner)
        if taken.previous:
            result = {"outcome": "superseded", "message_id": message_id, "owner": owner}
            self._superseded.append((taken.previous, result))
        return 1

    def _end_superseded(self) -> None:
        """Flower's last word on each lost run: succeeded, superseded by the fresh run
        (one event dispatcher a sweep; events are best effort, as Celery's own)."""
        ended, self._superseded = self._superseded, []
        if not ended:
            return
        try:
            with self.app.events.default_dispatcher() as dispatcher:
                for task_id, result in ended:
                    dispatcher.send(
                        "task-succeeded", uuid=task_id, result=repr(result), runtime=0.0
                    )
        except Exception as exc:  # a lost event costs a stale row in Flower, nothing more
            log.warning("redrive.event_failed", error=type(exc).__name__, detail=str(exc)[:200])

    def _redrive_chain(
        self, member: str, campaign_id: str, slot: int, cutoff: float, now: float
    ) -> int:
        run = f"{uuid.uuid4().hex[:12]}:0"
        taken = self._take_chain(
            due=self.keys.due(),
            meta=self.keys.campaign(campaign_id),
            member=member,
            cutoff=cutoff,
            field=f"tick:{slot}",
            run=run,
            now=now,
        )
        if taken != Take.TAKEN:
            return 0
        # The batch the lost tick had claimed is due again, before the new run starts.
        campaign_due = self.keys.campaign_due(campaign_id)
        claimed = self.keys.campaign_claimed(campaign_id, slot)
        while self._release_batch(campaign_due, claimed, now, RELEASE_CHUNK):
            pass
        self.app.send_task(
            TICK_TASK,
            args=(campaign_id,),
            kwargs={"slot": slot, "run": run},
            headers={PUBLISHED_AT: time.time()},
        )
        log.warning("redrive.campaign", campaign_id=campaign_id, slot=slot)
        return 1
