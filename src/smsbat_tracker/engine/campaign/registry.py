"""A campaign's registration and its hash: every message's first check, the tick chains and
their runs (the fencing tokens the ticks and the re-driver go by)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.engine.session import Subscription
from smsbat_tracker.errors import SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.models import validate_message_id
from smsbat_tracker.rules.decide import campaign_first_check_at, campaign_first_tick_at
from smsbat_tracker.store.campaign_scripts import TickNext, TickNextCode
from smsbat_tracker.store.keys import Keys

__all__ = ["ZADD_CHUNK", "Registry", "validate_campaign_id"]

log = get_logger(__name__)

ZADD_CHUNK: Final = 10_000


def validate_campaign_id(campaign_id: object) -> str:
    """Campaign ids follow the message-id rule (they become part of Redis keys)."""
    try:
        return validate_message_id(campaign_id)
    except SmsbatError as exc:
        raise type(exc)(str(exc).replace("message id", "campaign id")) from None


class Registry:
    """Campaigns as Redis holds them: registered once, their chains moved on fenced."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self.redis = engine.redis
        self._tick_next = TickNext(self.redis)

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
        validate_campaign_id(campaign_id)
        ids = list(dict.fromkeys(validate_message_id(m) for m in message_ids))  # dedupe
        meta_key = self.keys.campaign(campaign_id)
        deadline_at = enqueued_at + (deadline if deadline is not None else self.settings.deadline)
        ttl_ms = int((deadline_at - time.time() + self.settings.final_ttl) * 1000)
        if not self.redis.hsetnx(meta_key, "total", len(ids)):
            state, started, ends = self.redis.hmget(
                meta_key, ["state", "started_at", "deadline_at"]
            )
            if state != "registering":
                return False
            # The first call's times, which the messages already registered were scored by.
            enqueued_at = float(started or enqueued_at)
            deadline_at = float(ends or deadline_at)
        else:
            self.redis.hset(
                meta_key,
                mapping={
                    "started_at": repr(enqueued_at),
                    "deadline_at": repr(deadline_at),
                    "done": 0,
                    "state": "registering",
                    "subscription": subscription.to_json(),
                    "on_report": json.dumps(on_report) if on_report else "",
                },
            )
            self.redis.pexpire(meta_key, ttl_ms)
        due = self.keys.campaign_due(campaign_id)
        rules, rng = self.engine.rules, self.engine.rng.random
        for start in range(0, len(ids), ZADD_CHUNK):
            chunk = ids[start : start + ZADD_CHUNK]
            # Spread the first checks so a large send does not poll in one burst.
            scores = {
                m: campaign_first_check_at(
                    rules, started_at=enqueued_at, deadline_at=deadline_at, rng=rng
                )
                for m in chunk
            }
            self.redis.zadd(due, scores, nx=True)  # nx: a finished registration is resumable
        self.redis.pexpire(due, ttl_ms)
        first_tick = campaign_first_tick_at(rules, started_at=enqueued_at)
        pipe = self.redis.pipeline()
        for slot in range(self.settings.campaign_ticks):
            pipe.hset(meta_key, f"tick:{slot}", f"{uuid.uuid4().hex[:12]}:0")
            pipe.zadd(self.keys.due(), {Keys.due_tick(campaign_id, slot): first_tick})
        pipe.hset(meta_key, "state", "running")
        pipe.execute()
        log.info(
            "campaign.started", campaign_id=campaign_id, total=len(ids), deadline_at=deadline_at
        )
        return True

    def chains(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[int, str]:
        """Each tick chain's slot and its current run (the fencing token).

        ``meta``: the campaign hash, when the caller has just read it.
        """
        meta = self.meta(campaign_id) if meta is None else meta
        return {int(k[5:]): v for k, v in meta.items() if k.startswith("tick:")}

    def holds(self, campaign_id: str, slot: int, run: str) -> bool:
        """True while ``run`` is the chain ``slot``'s current run."""
        return self.redis.hget(self.keys.campaign(campaign_id), f"tick:{slot}") == run

    def next_run(self, campaign_id: str, slot: int, run: str, next_at: float) -> str | None:
        """Move the chain on to its next run, due at ``next_at``; None when taken over."""
        token, _, seq = run.rpartition(":")
        following = f"{token}:{int(seq) + 1}"
        moved = self._tick_next(
            meta_key=self.keys.campaign(campaign_id),
            due_index=self.keys.due(),
            chain_field=f"tick:{slot}",
            run=run,
            next_run=following,
            member=Keys.due_tick(campaign_id, slot),
            next_due=next_at,
        )
        return following if moved is TickNextCode.MOVED else None

    def meta(self, campaign_id: str) -> dict[str, str]:
        """The campaign hash (empty when unknown)."""
        raw = self.redis.hgetall(self.keys.campaign(campaign_id))
        return {str(k): str(v) for k, v in raw.items()}
