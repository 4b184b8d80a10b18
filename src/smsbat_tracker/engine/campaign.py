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
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from smsbat_tracker import metrics
from smsbat_tracker.engine.tracking import CHECK_WAIT, Engine, Subscription, build_result, iso
from smsbat_tracker.errors import RequestTimeout, SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.aioclient import BatchStatusClient
from smsbat_tracker.provider.models import MessageStatus, validate_message_id
from smsbat_tracker.rules.decide import (
    Answer,
    Ask,
    AwaitPush,
    Decision,
    Finish,
    Outcome,
    Progress,
    TryLater,
    Wait,
    decide,
    line_position,
)
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import STORE_LUA
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import ADJUST_LUA, RESERVE_LUA, pause_for

__all__ = ["CampaignRunner", "TickResult", "build_report", "validate_campaign_id"]

T = TypeVar("T")
log = get_logger(__name__)

# Claimed messages come back to the due set after this if their tick is slow (a lost
# tick's batch is put back at once when its chain is re-driven).
LEASE_SECONDS: Final = 60.0
ZADD_CHUNK: Final = 10_000
# Under a rate limit, the campaign's chains together claim what the limit lets them check
# in this many seconds.
CLAIM_SECONDS: Final = 1.0
# How long a batch waits for its last answers once every request has started: a slow
# answer is retried on its own short backoff rather than hold the whole batch (and its
# worker) for the read timeout.
STRAGGLER_WAIT: Final = 1.0

# KEYS: due, checks, then claimed and meta (a fenced chain).  ARGV: now, limit, lease until,
# the status key's text before and after the message id, then the chain's field and run.
# Claims the due messages for one batch, and notes them as the chain's batch. A batch the
# chain left noted was abandoned (its tick died, and this is the same run again): it is due
# again first. A run that was taken over claims nothing.
# Returns the claimed ids each followed by its due time, then their cached statuses, their
# checks so far and their requests failed in a row (what the rules need), in one round trip.
_CLAIM = """
if KEYS[3] then
  if redis.call('HGET', KEYS[4], ARGV[6]) ~= ARGV[7] then return {{}, {}, {}, {}} end
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], id)
  end
  redis.call('DEL', KEYS[3])
end
local claimed = redis.call(
  'ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local ids, cached, checks, failures = {}, {}, {}, {}
for i = 1, #claimed, 2 do
  local id = claimed[i]
  ids[#ids + 1] = id
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
  cached[#cached + 1] = redis.call('GET', ARGV[4] .. id .. ARGV[5]) or ''
  checks[#checks + 1] = redis.call('HGET', KEYS[2], id) or '0'
  failures[#failures + 1] = redis.call('HGET', KEYS[2], 'f:' .. id) or '0'
end
if KEYS[3] and #ids > 0 then redis.call('SADD', KEYS[3], unpack(ids)) end
return {claimed, cached, checks, failures}
"""

# KEYS: the rate limit's four keys, the campaign's due set, then each message's gate.
# ARGV: whether the limit is on ('1'), gate ms, the limit's arguments for all the messages
# (RateLimiter.script_args), then each message's id and due time.
# A batch's turn: tokens for the whole batch in the limit's line (or the batch goes back
# in the due set: {0, us until its turn}), then each message's gate; a message checked
# by someone else within the minimum interval gives its token back.  Returns {1, us until
# the last token, the messages' gates taken (1/0)}.
_TURNS = (
    RESERVE_LUA
    + ADJUST_LUA
    + """
local gates = #KEYS - 5
local booked, wait = 1, 0
if ARGV[1] == '1' then
  local turn = reserve({KEYS[1], KEYS[2], KEYS[3], KEYS[4]},
    {ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]})
  booked, wait = turn[1], turn[2]
end
if booked == 0 then
  for i = 1, gates do redis.call('ZADD', KEYS[5], 'XX', ARGV[10 + 2 * i], ARGV[9 + 2 * i]) end
  return {0, wait, {}}
end
local got, missed = {}, 0
for i = 1, gates do
  if redis.call('SET', KEYS[5 + i], 1, 'PX', ARGV[2], 'NX') then
    got[i] = 1
  else
    got[i] = 0
    missed = missed + 1
  end
end
if missed > 0 and ARGV[1] == '1' then unreserve(KEYS, tonumber(ARGV[3]), missed) end
return {1, wait, got}
"""
)

# KEYS: the campaign's checks, due set, outcomes, meta, unsent, the rate limit's pause, the
# chain's claimed set, then the status keys of the answers to cache.  ARGV: ttl ms, now ms
# ('' when nobody wants per-message callbacks), pause ms (''), then how many messages are
# cached, re-scored, counted and recorded, the chain's field ('' for none) and run, how
# many failed, then each answer's StatusCache.store_args, (id, score) pairs, counted ids
# (an answer: one more check, no failures), failed ids (one more failure in a row; kept in
# the checks hash as 'f:<id>'), and (id, outcome, record) triples.
# A batch's after-step in one round trip: caches the answers, re-scores and counts, pauses
# every caller after a 429, records each outcome once (noted as unsent until its callback
# is confirmed), and forgets the chain's claimed batch (unless the run was taken over: the
# noted batch is then the new run's).  Returns the ids this call recorded, how many
# messages are left in the due set, the first one's due time, and whether it paused.
_AFTER_BATCH = (
    STORE_LUA
    + ADJUST_LUA
    + """
local stores, rescored, counted, finals = tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]), tonumber(ARGV[7])
local failed = tonumber(ARGV[10])
local at = 11
for i = 1, stores do
  local A = {}
  for j = 0, 9 do A[j + 1] = ARGV[at + (i - 1) * 10 + j] end
  store({KEYS[7 + i]}, A)
end
at = at + stores * 10
for i = 1, rescored do
  redis.call('ZADD', KEYS[2], 'XX', ARGV[at + 1], ARGV[at])
  at = at + 2
end
for i = 1, counted do
  redis.call('HINCRBY', KEYS[1], ARGV[at], 1)
  redis.call('HDEL', KEYS[1], 'f:' .. ARGV[at])
  at = at + 1
end
for i = 1, failed do
  redis.call('HINCRBY', KEYS[1], 'f:' .. ARGV[at], 1)
  at = at + 1
end
local paused = 0
if ARGV[3] ~= '' then paused = pause({'', KEYS[6]}, tonumber(ARGV[3])) end
local recorded = {}
for i = 1, finals do
  local id = ARGV[at]
  if redis.call('HSETNX', KEYS[3], id, ARGV[at + 2]) == 1 then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[1], id, 'f:' .. id)
    redis.call('HINCRBY', KEYS[4], 'done', 1)
    redis.call('HINCRBY', KEYS[4], 'n:' .. ARGV[at + 1], 1)
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[5], id, ARGV[2]) end
    recorded[#recorded + 1] = id
  end
  at = at + 3
end
if finals > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[1]) end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[4], ARGV[8]) == ARGV[9] then
  redis.call('DEL', KEYS[7])
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {recorded, redis.call('ZCARD', KEYS[2]), head[2] or '', paused}
"""
)

# KEYS: unsent.  ARGV: message id, the stamp its sender read, a new stamp.  Takes a
# callback to send, unless another tick took it since (1 or 0).
_TAKE_UNSENT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: meta, due index.  ARGV: field, expected run, next run, member, next due score.
# Moves a tick chain on to its next run, fenced: 0 when the chain was taken over.
_TICK_NEXT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
return 1
"""

# KEYS: meta, unsent, due index.  ARGV: now ms, stale ms, then the chains' due members.
# Claims the report's dispatch (1, or 3 when taken over from a sender that stopped) unless
# it is sent or freshly claimed (0); with nothing claimed and nothing unsent, the
# campaign's chains leave the due index (2).
_CLAIM_REPORT = """
local mark = redis.call('HGET', KEYS[1], 'report_sent')
if not mark then
  redis.call('HSET', KEYS[1], 'report_sent', ARGV[1])
  return 1
end
if mark ~= 'sent' and tonumber(ARGV[1]) - tonumber(mark) > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'report_sent', ARGV[1])
  return 3
end
if mark == 'sent' and redis.call('HLEN', KEYS[2]) == 0 then
  for i = 3, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
  return 2
end
return 0
"""


def validate_campaign_id(campaign_id: object) -> str:
    """Campaign ids follow the message-id rule (they become part of Redis keys)."""
    try:
        return validate_message_id(campaign_id)
    except SmsbatError as exc:
        raise type(exc)(str(exc).replace("message id", "campaign id")) from None


class LoopThread:
    """One event loop on a daemon thread per process, for the async batch client.

    aiohttp sessions belong to one loop; keeping the loop (and its connections) alive
    between ticks avoids a new connection pool, and new TLS handshakes, every batch.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        """Stop the loop and wait for the thread."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did."""

    claimed: int
    api_calls: int
    recorded: int
    finished: bool
    next_in: float | None


def _result(
    campaign_id: str,
    message_id: str,
    outcome: Outcome,
    status: MessageStatus | None,
    error: str | None,
    started_at: float,
    now: float,
) -> dict[str, Any]:
    return build_result(
        message_id,
        outcome,
        status=status,
        started_at=started_at,
        polls=None,
        error=error,
        now=now,
        campaign_id=campaign_id,
    )


def _currency(status: MessageStatus) -> str:
    return status.billCurrency or status.rateCurrency or "unknown"


def _amount(status: MessageStatus) -> float:
    for value in (status.billAmount, status.cost):
        if value is not None:
            return float(value)
    return 0.0


def _compact(outcome: str, status: MessageStatus | None, elapsed: float) -> str:
    """The per-message record: a few dozen bytes, enough for the report."""
    record: dict[str, Any] = {"o": outcome, "t": round(elapsed, 2)}
    if status is not None:
        record["s"] = status.deliverystatus
        record["c"] = _amount(status)
        record["cur"] = _currency(status)
        if status.fallbacks or status.extendedStatuses:
            record["x"] = 1
        if status.used_fallback:
            record["fb"] = 1
    return json.dumps(record, separators=(",", ":"))


def build_report(
    campaign_id: str,
    meta: dict[str, str],
    records: Iterable[tuple[str, str]],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivery report from the campaign hash and its compact outcome records (each
    with its message id); it lists the ids that failed and that timed out."""
    counts: Counter[str] = Counter()
    costs: dict[str, float] = defaultdict(float)
    times: list[float] = []
    failed: list[str] = []
    timed_out: list[str] = []
    extended = fallback = 0
    for message_id, raw in records:
        rec = json.loads(raw)
        counts[rec["o"]] += 1
        if rec["o"] == "timeout":
            timed_out.append(message_id)
        elif rec["o"] != "delivered":
            failed.append(message_id)
        if rec.get("c"):
            costs[rec.get("cur") or "unknown"] += float(rec["c"])
        if rec["o"] in ("delivered", "undeliverable", "permanenterror"):
            times.append(float(rec["t"]))
        extended += int(rec.get("x", 0))
        fallback += int(rec.get("fb", 0))
    total = int(meta.get("total", 0))
    pending = max(total - sum(counts.values()), 0)

    def pct(q: float) -> float | None:
        if not times:
            return None
        if len(times) == 1:
            return round(times[0], 2)
        return round(statistics.quantiles(times, n=100, method="inclusive")[int(q) - 1], 2)

    return {
        "campaign_id": campaign_id,
        "total": total,
        "finished": pending == 0 and meta.get("state") == "finished",
        "pending": pending,
        "outcomes": {
            k: counts.get(k, 0)
            for k in ("delivered", "undeliverable", "permanenterror", "timeout", "error")
        },
        "delivery_rate": round(counts.get("delivered", 0) / total, 4) if total else None,
        "cost": {cur: round(v, 6) for cur, v in sorted(costs.items())},
        "time_to_final_p50": pct(50),
        "time_to_final_p95": pct(95),
        "fallback": {"extended": extended, "used": fallback},
        # Undeliverable, permanent errors and errors; then the timeouts: what to send again.
        "failed_ids": sorted(failed),
        "timeout_ids": sorted(timed_out),
        "started_at": iso(float(meta["started_at"])) if "started_at" in meta else None,
        "deadline_at": iso(float(meta["deadline_at"])) if "deadline_at" in meta else None,
        "reported_at": iso(time.time() if now is None else now),
    }


class CampaignRunner:
    """Campaign operations for one process, on top of the tracking :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.keys = engine.keys
        self.redis = engine.redis
        self._claim = self.redis.register_script(_CLAIM)
        self._turns = self.redis.register_script(_TURNS)
        self._after = self.redis.register_script(_AFTER_BATCH)
        self._tick_next = self.redis.register_script(_TICK_NEXT)
        self._claim_report = self.redis.register_script(_CLAIM_REPORT)
        self._take_unsent = self.redis.register_script(_TAKE_UNSENT)
        self._loop: LoopThread | None = None
        self._client: BatchStatusClient | None = None
        self._lock = threading.Lock()

    # --- starting -------------------------------------------------------------------------

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
        first = self.settings.first_delay
        jitter = self.settings.jitter
        for start in range(0, len(ids), ZADD_CHUNK):
            chunk = ids[start : start + ZADD_CHUNK]
            # Spread the first checks so a large send does not poll in one burst.
            scores = {
                m: min(enqueued_at + first * (1 + jitter * (2 * random.random() - 1)), deadline_at)
                for m in chunk
            }
            self.redis.zadd(due, scores, nx=True)  # nx: a finished registration is resumable
        self.redis.pexpire(due, ttl_ms)
        first_tick = enqueued_at + first * (1 - jitter)
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
            keys=[self.keys.campaign(campaign_id), self.keys.due()],
            args=[
                f"tick:{slot}",
                run,
                following,
                Keys.due_tick(campaign_id, slot),
                repr(next_at),
            ],
        )
        return following if moved else None

    def meta(self, campaign_id: str) -> dict[str, str]:
        """The campaign hash (empty when unknown)."""
        raw = self.redis.hgetall(self.keys.campaign(campaign_id))
        return {str(k): str(v) for k, v in raw.items()}

    # --- ticking --------------------------------------------------------------------------

    def _runtime(self) -> tuple[LoopThread, BatchStatusClient]:
        with self._lock:
            if self._loop is None:
                self._loop = LoopThread()
            if self._client is None:
                settings = self.settings

                async def make() -> BatchStatusClient:
                    return BatchStatusClient.from_settings(
                        settings, max_connections=settings.campaign_concurrency
                    )

                self._client = self._loop.run(make())
            return self._loop, self._client

    def close(self) -> None:
        """Close the batch client and its loop."""
        with self._lock:
            if self._loop is not None:
                if self._client is not None:
                    self._loop.run(self._client.aclose())
                self._loop.stop()
            self._loop = self._client = None

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
                self._dispatch_report(campaign_id, meta, report)
            return TickResult(0, 0, 0, True, None)
        self.resend_unsent(campaign_id, meta)
        now = time.time()
        started_at = float(meta["started_at"])
        deadline_at = float(meta["deadline_at"])
        # Past the deadline check's grace and one more tick: what is left is decided now.
        grace = self.settings.deadline_grace + self.settings.max_delay + self.settings.min_interval
        if now > deadline_at + grace:
            self.finish(campaign_id, meta)
            return TickResult(0, 0, 0, True, None)

        due_key = self.keys.campaign_due(campaign_id)
        batch = self.settings.campaign_batch
        limiter = self.engine.limiter
        if limiter.enabled:
            # No more than the rate limit lets this tick check in about a second: a batch
            # that waits long for tokens holds its messages from the other chains, and a
            # tick killed meanwhile takes them down with it until its chain is re-driven.
            share = limiter.rate * CLAIM_SECONDS / self.settings.campaign_ticks
            batch = max(1, min(batch, int(share)))
        lease = LEASE_SECONDS + (batch / limiter.rate if limiter.enabled else 0)
        # Round trip one: claim the batch, with what the rules need of each message.
        claim_keys = [due_key, self.keys.campaign_checks(campaign_id)]
        head, tail = self.keys.status("\0").split("\0")
        claim_args: list[Any] = [repr(now), batch, repr(now + lease), head, tail]
        chain: tuple[int, str] | None = None
        if slot is not None and run is not None:
            chain = (slot, run)
            claim_keys += [
                self.keys.campaign_claimed(campaign_id, slot),
                self.keys.campaign(campaign_id),
            ]
            claim_args += [f"tick:{slot}", run]
        claimed, raws, checks, failures = self._claim(keys=claim_keys, args=claim_args)
        due = {str(claimed[i]): float(claimed[i + 1]) for i in range(0, len(claimed), 2)}
        cached = self._parse_cached(list(due), raws)
        progress = {
            m: Progress(started_at, deadline_at, int(n), failures=int(f))
            for m, n, f in zip(due, checks, failures, strict=True)
        }
        api_calls, turn, decisions, answers = self._check_batch(
            campaign_id, due, cached, progress, waiter=f"c:{campaign_id}:{slot}"
        )
        # Round trip two: cache, count, re-score, record.
        recorded, left, first = self._record(
            campaign_id, meta, decisions, started_at, answers=answers, chain=chain
        )
        if not left:
            self.finish(campaign_id, meta)
            return TickResult(len(due), api_calls, recorded, True, None)
        next_in = max(0.0, first - time.time()) if first is not None else 0.0
        if turn is not None:
            next_in = max(next_in, turn)
        return TickResult(
            len(due), api_calls, recorded, False, min(next_in, self.settings.max_delay)
        )

    def _check_batch(
        self,
        campaign_id: str,
        due: dict[str, float],
        cached: dict[str, CachedStatus],
        progress: dict[str, Progress],
        *,
        waiter: str,
    ) -> tuple[int, float | None, dict[str, Decision], dict[str, Answer]]:
        """Check a claimed batch (``due``: each id's due time).

        Returns the API calls made; when the rate limit has no turn for the batch yet, the
        seconds until it has (the messages to ask are then back in the due set); each
        message's decision; and the answers.
        """
        engine, settings = self.engine, self.settings
        limiter = engine.limiter
        now = time.time()
        decisions: dict[str, Decision] = {}
        to_call: list[str] = []
        for m in due:
            decision = decide(progress[m], cached=cached.get(m), now=now, rules=engine.rules)
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
            # set and its tick comes back when its turn comes. Then each message's gate,
            # the per-message minimum interval shared with track_message and get_status.
            args: list[Any] = [
                "1" if limiter.enabled else "",
                int(settings.min_interval * 1000),
                *limiter.script_args(
                    len(to_call),
                    # The batch's own pace, and no more: a tick does not sleep on a worker.
                    ahead=len(to_call) / limiter.rate + CHECK_WAIT if limiter.enabled else 0.0,
                    waiter=waiter,
                    due_at=min(line_position(progress[m], due_at=due[m], now=now) for m in to_call),
                ),
            ]
            for m in to_call:
                args += [m, repr(due[m])]
            booked, wait_us, gates = self._turns(
                keys=[
                    *limiter.keys,
                    self.keys.campaign_due(campaign_id),
                    *(self.keys.poll_gate(m) for m in to_call),
                ],
                args=args,
            )
            wait = int(wait_us) / 1_000_000
            if not booked:
                turn = wait
                metrics.get().rate_waits.labels("deferred").inc(len(to_call))
            elif wait > 0:
                metrics.get().rate_waits.labels("slept").inc(len(to_call))
            for m, ok in zip(to_call, gates, strict=False):
                if int(ok):
                    gated.append(m)
                else:  # checked by someone else just now: look again shortly
                    answers[m] = TryLater(settings.min_interval)
        if gated:
            answers.update(self._fetch(gated, wait))
        now = time.time()
        for m, answer in answers.items():
            decisions[m] = decide(
                progress[m], cached=cached.get(m), now=now, rules=engine.rules, answer=answer
            )
        return len(gated), turn, decisions, answers

    def _fetch(self, ids: list[str], wait: float) -> dict[str, MessageStatus | SmsbatError]:
        """Ask the API for ``ids``, whose tokens come due one interval apart, the last
        after ``wait``: each slice is sent when its tokens are due, at the limit's pace.

        A straggler does not hold the batch: once every request has started, the batch
        waits at most :data:`STRAGGLER_WAIT` for the last answers; a request still open
        then is cancelled and counts as failed (retried on its own short backoff).
        """
        limiter, settings = self.engine.limiter, self.settings
        loop, client = self._runtime()

        async def fetch() -> dict[str, MessageStatus | SmsbatError]:
            gate = asyncio.Semaphore(settings.campaign_concurrency)
            started = [0, time.monotonic()]  # how many started, when the last did

            async def one(message_id: str) -> MessageStatus | SmsbatError:
                async with gate:
                    started[0] += 1
                    started[1] = time.monotonic()
                    try:
                        return await client.get_status(message_id)
                    except SmsbatError as exc:
                        return exc

            step = limiter.burst if limiter.enabled else len(ids)
            begin = time.monotonic()
            tasks: dict[str, asyncio.Task[MessageStatus | SmsbatError]] = {}
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                if limiter.enabled:
                    later = (len(ids) - start - len(chunk)) / limiter.rate
                    delay = wait - later - (time.monotonic() - begin)
                    if delay > 0:
                        await asyncio.sleep(delay)
                for m in chunk:
                    tasks[m] = asyncio.ensure_future(one(m))
            pending = set(tasks.values())
            while pending:
                _, pending = await asyncio.wait(pending, timeout=STRAGGLER_WAIT / 4)
                if started[0] == len(ids) and time.monotonic() - started[1] > STRAGGLER_WAIT:
                    break
            late = RequestTimeout(f"no answer within {STRAGGLER_WAIT:g} s; the batch went on")
            results: dict[str, MessageStatus | SmsbatError] = {}
            for m, task in tasks.items():
                if task in pending:
                    task.cancel()
                    results[m] = late
                    metrics.get().api_network_error()
                else:
                    results[m] = task.result()
            return results

        return loop.run(fetch())

    def _cached(self, ids: list[str]) -> dict[str, CachedStatus]:
        return self._parse_cached(ids, self.redis.mget([self.keys.status(m) for m in ids]))

    def _parse_cached(self, ids: list[str], raws: Sequence[Any]) -> dict[str, CachedStatus]:
        """The cache entries read for ``ids`` (a damaged or missing one is left out)."""
        out = {}
        for m, raw in zip(ids, raws, strict=True):
            entry = self.engine.cache.parse(raw) if raw else None
            if entry is not None:
                out[m] = entry
        return out

    def _record(
        self,
        campaign_id: str,
        meta: dict[str, str],
        decisions: dict[str, Decision],
        started_at: float,
        *,
        answers: dict[str, Answer] | None = None,
        chain: tuple[int, str] | None = None,
    ) -> tuple[int, int, float | None]:
        """Apply a batch's decisions in one round trip: cache the answers, re-score and
        count, record the outcomes (and send their callbacks), forget the chain's batch.

        Returns the outcomes recorded, how many messages are left due, and when the first
        of them is due.
        """
        now = time.time()
        finals: list[tuple[str, Outcome, MessageStatus | None, str | None]] = []
        rescore: list[Any] = []
        counted: list[str] = []
        failed: list[str] = []
        for m, decision in decisions.items():
            if isinstance(decision, Finish):
                finals.append((m, decision.outcome, decision.status, decision.error))
            elif isinstance(decision, Wait | AwaitPush):
                rescore += [m, repr(now + decision.seconds)]
            if isinstance(decision, Wait) and decision.counted:
                counted.append(m)
            elif isinstance(decision, Wait) and decision.failed:
                failed.append(m)
        statuses = {m: a for m, a in (answers or {}).items() if isinstance(a, MessageStatus)}
        pauses = [p for a in (answers or {}).values() if (p := pause_for(a)) is not None]
        sub = self._subscription(meta)
        stamp = str(int(now * 1000)) if sub else ""
        slot, run = chain if chain is not None else (None, "")
        args: list[Any] = [
            int(self.settings.final_ttl * 1000),
            stamp,
            max(1, int(max(pauses) * 1000)) if pauses else "",
            len(statuses),
            len(rescore) // 2,
            len(counted),
            len(finals),
            f"tick:{slot}" if chain is not None else "",
            run,
            len(failed),
        ]
        for answer in statuses.values():
            args += self.engine.cache.store_args(answer, source="poll")
        args += rescore + counted + failed
        for m, outcome, status, _error in finals:
            args += [m, outcome, _compact(outcome, status, now - started_at)]
        reply, left, first, paused = self._after(
            keys=[
                self.keys.campaign_checks(campaign_id),
                self.keys.campaign_due(campaign_id),
                self.keys.campaign_outcomes(campaign_id),
                self.keys.campaign(campaign_id),
                self.keys.campaign_unsent(campaign_id),
                self.engine.limiter.keys[1],
                self.keys.campaign_claimed(campaign_id, slot if slot is not None else -1),
                *(self.keys.status(m) for m in statuses),
            ],
            args=args,
        )
        if int(paused):
            log.warning("ratelimit.pause", seconds=round(max(pauses), 3))
        recorded = {str(m) for m in reply}
        if recorded:
            counts = metrics.get().campaign_outcomes
            for m, outcome, _status, _error in finals:
                if m in recorded:
                    counts.labels(outcome).inc()
        if sub is not None and recorded:
            self._send(
                campaign_id,
                sub,
                [
                    (m, _result(campaign_id, m, outcome, status, error, started_at, now))
                    for m, outcome, status, error in finals
                    if m in recorded
                ],
                dict.fromkeys(recorded, stamp),
            )
        return len(recorded), int(left), float(first) if first else None

    def _at_deadline(
        self, meta: dict[str, str], ids: list[str], cached: dict[str, CachedStatus]
    ) -> dict[str, Decision]:
        """What the rules make of messages left unfinished when the campaign ends: decided
        as at the end of the deadline check's grace, with no time left to ask."""
        rules, deadline_at = self.engine.rules, float(meta["deadline_at"])
        now = max(time.time(), deadline_at + rules.deadline_grace)
        out: dict[str, Decision] = {}
        for m in ids:
            progress = Progress(float(meta["started_at"]), deadline_at)
            decision = decide(progress, cached=cached.get(m), now=now, rules=rules)
            if isinstance(decision, Ask):
                decision = decide(
                    progress, cached=cached.get(m), now=now, rules=rules, answer=TryLater(0.0)
                )
            out[m] = decision
        return out

    @staticmethod
    def _subscription(meta: dict[str, str]) -> Subscription | None:
        sub = Subscription.from_json(meta["subscription"]) if meta.get("subscription") else None
        return sub if sub is not None and not sub.is_empty else None

    def _send(
        self,
        campaign_id: str,
        sub: Subscription,
        results: list[tuple[str, dict[str, Any]]],
        stamps: dict[str, str],
        *,
        maybe_sent: bool = False,
    ) -> None:
        """Send per-message callbacks, each taken just before and confirmed just after.

        ``stamps`` holds each message's unsent stamp as this tick read it. A tick that
        stalled (a Redis outage) while another one took its callbacks over sends nothing
        twice but the one it was sending; one killed halfway leaves only what it did not
        confirm.
        """
        from celery import signature

        key = self.keys.campaign_unsent(campaign_id)
        for message_id, result in results:
            taken = self._take_unsent(
                keys=[key], args=[message_id, stamps[message_id], int(time.time() * 1000)]
            )
            if not taken:
                continue
            callback = sub.callback_for(str(result["outcome"]))
            if callback:
                sig = signature(callback, app=self.engine.app)
                task_id = self.keys.dispatch_id(campaign_id, message_id)
                # A re-send: the tick that took it may have sent it before it stopped.
                self.engine.send_once([(sig, task_id, {})], result, maybe_sent=maybe_sent)
            self.redis.hdel(key, message_id)

    def resend_unsent(self, campaign_id: str, meta: dict[str, str]) -> int:
        """Send again the callbacks a tick took and did not confirm in time (it died)."""
        key = self.keys.campaign_unsent(campaign_id)
        sub = self._subscription(meta)
        if sub is None or not self.redis.hlen(key):
            return 0
        now = time.time()
        stale = {
            str(m): str(at)
            for m, at in self.redis.hgetall(key).items()
            if now * 1000 - int(at) > self.settings.redrive_after * 1000
        }
        if not stale:
            return 0
        ids = list(stale)
        records = self.redis.hmget(self.keys.campaign_outcomes(campaign_id), ids)
        cached = self._cached(ids)
        started_at = float(meta["started_at"])
        results = []
        for m, raw in zip(ids, records, strict=True):
            if raw is None:
                continue
            outcome = json.loads(raw)["o"]
            status = cached[m].status if m in cached else None
            results.append((m, _result(campaign_id, m, outcome, status, None, started_at, now)))
        log.warning("campaign.resend", campaign_id=campaign_id, count=len(results))
        self._send(campaign_id, sub, results, stale, maybe_sent=True)
        return len(results)

    # --- finishing ------------------------------------------------------------------------

    def finish(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Time out what is left, write the report once, and dispatch ``on_report``."""
        meta = meta or self.meta(campaign_id)
        if not meta:
            return None
        due_key = self.keys.campaign_due(campaign_id)
        started_at = float(meta["started_at"])
        while True:
            left = [str(m) for m in self.redis.zrange(due_key, 0, 999)]
            if not left:
                break
            cached = self._cached(left)
            self._record(campaign_id, meta, self._at_deadline(meta, left, cached), started_at)
            self.redis.zrem(due_key, *left)  # recorded earlier by another tick: drop anyway
        self.redis.hset(self.keys.campaign(campaign_id), "state", "finished")
        meta = self.meta(campaign_id)
        self.resend_unsent(campaign_id, meta)
        report = self.report(campaign_id, meta)
        written = self.redis.set(
            self.keys.campaign_report(campaign_id),
            json.dumps(report),
            nx=True,
            px=int(self.settings.final_ttl * 1000),
        )
        if written:
            metrics.get().campaigns_finished.inc()
            log.info(
                "campaign.report",
                campaign_id=campaign_id,
                total=report["total"],
                delivery_rate=report["delivery_rate"],
                outcomes=report["outcomes"],
            )
            self.redis.delete(self.keys.campaign_checks(campaign_id))
        else:
            report = self.stored_report(campaign_id) or report
        self._dispatch_report(campaign_id, meta, report)
        return report

    def _dispatch_report(
        self, campaign_id: str, meta: dict[str, str], report: dict[str, Any]
    ) -> None:
        """Send ``on_report`` once, then let the chains leave the due index."""
        args: list[Any] = [int(time.time() * 1000), int(self.settings.redrive_after * 1000)]
        args += [Keys.due_tick(campaign_id, slot) for slot in self.chains(campaign_id, meta)]
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.campaign_unsent(campaign_id),
            self.keys.due(),
        ]
        claim = self._claim_report(keys=keys, args=args)
        if claim not in (1, 3):  # 3: taken over from a sender that stopped, maybe sent
            return
        on_report = json.loads(meta["on_report"]) if meta.get("on_report") else None
        if on_report:
            from celery import signature

            sig = signature(on_report, app=self.engine.app)
            task_id = self.keys.dispatch_id(campaign_id, "report")
            self.engine.send_once([(sig, task_id, {})], report, maybe_sent=claim == 3)
        self.redis.hset(self.keys.campaign(campaign_id), "report_sent", "sent")
        self._claim_report(keys=keys, args=args)

    def report(self, campaign_id: str, meta: dict[str, str] | None = None) -> dict[str, Any]:
        """The report as of now (partial while the campaign runs)."""
        meta = meta if meta is not None else self.meta(campaign_id)
        records = self.redis.hscan_iter(self.keys.campaign_outcomes(campaign_id), count=2_000)
        return build_report(campaign_id, meta, ((str(k), str(v)) for k, v in records))

    def stored_report(self, campaign_id: str) -> dict[str, Any] | None:
        """The final report, once written."""
        raw = self.redis.get(self.keys.campaign_report(campaign_id))
        return json.loads(raw) if raw else None

    def progress(self, campaign_id: str) -> dict[str, int]:
        """Totals for a progress display: total, done, and counts per outcome."""
        meta = self.meta(campaign_id)
        out = {"total": int(meta.get("total", 0)), "done": int(meta.get("done", 0))}
        for key, value in meta.items():
            if key.startswith("n:"):
                out[key[2:]] = int(value)
        return out
