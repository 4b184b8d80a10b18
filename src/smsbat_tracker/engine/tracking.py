"""The tracking engine: sessions, status checks, and the exactly-once final outcome.

Celery tasks (:mod:`smsbat_tracker.celery.tasks`) and the webhook call into :class:`Engine`; it
holds no state of its own beyond connections, so one per process serves every task.

Per message, Redis holds (see :mod:`smsbat_tracker.store.keys`):

- a *session* hash: the owner task id (the one poller) and the run it expects next (with
  the owner, the fencing token), start and deadline, counters;
- *subscriptions*: each distinct set of callbacks (and captured chain) asking for the
  outcome; the same set enqueued twice is one subscription;
- the *outcome*: written once with SET NX semantics inside a Lua script that also claims
  every subscription not yet dispatched. Only the caller that claims a subscription
  dispatches its callback, so a duplicate enqueue, a redelivered task or a webhook racing
  the poller never fires a callback twice;
- an entry in the *due index* (see :mod:`smsbat_tracker.celery.redrive`), written by the same
  scripts that record each check and each dispatch, so that a lost run is re-driven.

Once the outcome is recorded and every subscription dispatched, the tracking is cut back to
the outcome alone (``_FORGET_LUA``): the result with the final status, and the ids of the
subscriptions it served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import redis

from smsbat_tracker import metrics
from smsbat_tracker.config import NO_CREDENTIALS, Settings
from smsbat_tracker.errors import ConfigError, RateLimited, RequestTimeout, SmsbatError
from smsbat_tracker.log import get_logger
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.provider.models import DELIVERED, IN_FLIGHT, MessageStatus, validate_message_id
from smsbat_tracker.rules.decide import OUTCOMES, Outcome, Progress, Rules, TryLater
from smsbat_tracker.rules.schedule import Schedule
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import STORE_LUA, StatusCache
from smsbat_tracker.store.keys import (
    KOMBU_PRIORITY_STEPS,
    Keys,
    kombu_queue_list,
    kombu_unacked_key,
)
from smsbat_tracker.store.ratelimit import ADJUST_LUA, RESERVE_LUA, RateLimiter

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

__all__ = [
    "CHECK_WAIT",
    "OUTCOMES",
    "Check",
    "Engine",
    "Outcome",
    "Session",
    "SettleResult",
    "Start",
    "Subscription",
    "TryLater",
    "Turn",
    "build_result",
    "iso",
]

# The longest a check sleeps in its worker for a rate-limit token: past that it hands the
# worker back and comes back when the limit says its turn comes (a sleeping check would
# hold up the callbacks queued behind it).
CHECK_WAIT: Final = 0.25

log = get_logger(__name__)

# The session-opening piece of _REGISTER and _BEFORE.  KEYS[1]: session, and ``due`` is set by
# the script.  ARGV: owner, started_at, deadline_at, ttl ms, first due score, due member.
# Creates the session if absent (its owner runs 0 comes next, and the due index learns
# when); reads the _SESSION_FIELDS.
_SESSION_FIELDS: Final = (
    "owner",
    "started_at",
    "deadline_at",
    "checks",
    "polls",
    "pushed",
    "run",
    "failures",
)
_OPEN_SESSION = (
    """
if redis.call('HSETNX', KEYS[1], 'owner', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'run', 0, 'started_at', ARGV[2], 'deadline_at', ARGV[3],
             'checks', 0, 'polls', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('ZADD', due, ARGV[5], ARGV[6])
end
local session = redis.call('HMGET', KEYS[1], """
    + ", ".join(f"'{name}'" for name in _SESSION_FIELDS)
    + ")\n"
)

# KEYS: session, subs, status, due, outcome.  ARGV: as _OPEN_SESSION, then subscription id
# ('' for none), its JSON, subs ttl ms.  A new tracking's whole registration in one round trip: the
# subscription (HSETNX), the session, and the cached status. A subscription that joins a
# session which may have ended already gets a due entry too: if its run is lost, the
# re-driver finishes its dispatch.
_REGISTER = (
    """
local due = KEYS[4]
local added = 0
if ARGV[7] ~= '' then
  added = redis.call('HSETNX', KEYS[2], ARGV[7], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[9])
end
"""
    + _OPEN_SESSION
    + """
if added == 1 then redis.call('ZADD', due, 'NX', ARGV[5], ARGV[6]) end
return {session, added, redis.call('GET', KEYS[3]), redis.call('EXISTS', KEYS[5])}
"""
)

# ``take_turn(gate, K, A)``: may this caller ask the API now? ``gate``: the message's gate;
# K: the rate limit's keys; A: gate ms, whether the limit is on ('1'), then the limit's
# arguments (RateLimiter.script_args). The per-message minimum interval first ({2, ms
# left} while it runs), then a rate-limit token ({0, us to wait} without one); with one
# the gate is taken ({1, us until the token is due}).
_TURN_LUA = (
    RESERVE_LUA
    + """
local function take_turn(gate, K, A)
  local left = redis.call('PTTL', gate)
  if left > 0 then return {2, left} end
  local booked, wait = 1, 0
  if A[2] == '1' then
    local turn = reserve(K, {A[3], A[4], A[5], A[6], A[7], A[8], A[9], A[10]})
    booked, wait = turn[1], turn[2]
  end
  if booked == 1 then redis.call('SET', gate, 1, 'PX', A[1]) end
  return {booked, wait}
end
"""
)

# KEYS: gate, then the rate limit's four keys.  ARGV: take_turn's.  A one-off caller's
# turn (get_status).
_TAKE_TURN = _TURN_LUA + "return take_turn(KEYS[1], {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV)\n"

# The first of a check's two round trips.  KEYS: session, outcome, status, due, gate, then
# the rate limit's four keys.  ARGV: as _OPEN_SESSION, then the run, then take_turn's.
# Everything a run needs before it decides: the session (created when the task was sent by
# name), the recorded outcome and the cached status; and, for the run the session expects
# while nothing is recorded, a turn to ask the API, taken ahead of the decision. A run that
# does not ask gives it back in the second round trip.  Returns {session, outcome or '',
# cached or '', turn ({3, 0}: none taken)}.
_BEFORE = (
    _TURN_LUA
    + "local due = KEYS[4]\n"
    + _OPEN_SESSION
    + """
local outcome = string.match(redis.call('GET', KEYS[2]) or '', '^[^\\n]*')
local cached = redis.call('GET', KEYS[3]) or ''
local turn = {3, 0}
if outcome == '' and session[1] == ARGV[1]
    and ((not session[7]) or tonumber(session[7]) == tonumber(ARGV[7])) then
  local A = {}
  for i = 8, #ARGV do A[#A + 1] = ARGV[i] end
  turn = take_turn(KEYS[5], {KEYS[6], KEYS[7], KEYS[8], KEYS[9]}, A)
end
return {session, outcome, cached, turn}
"""
)

# ``reschedule(K, A)``: K: session, due; A: owner, run, next due score, due member, what
# the run was: '1' a check (an answer), 'f' a failed request, '0' neither.  Records it and
# schedules the owner's next run, fenced: only the session's owner, in the run the session
# expects, may. Returns 0 when the run was superseded.
_RESCHEDULE_LUA = """
local function reschedule(K, A)
  local s = redis.call('HMGET', K[1], 'owner', 'run')
  if s[1] ~= A[1] or (s[2] and tonumber(s[2]) ~= tonumber(A[2])) then return 0 end
  if A[5] == '1' then
    redis.call('HINCRBY', K[1], 'checks', 1)
    redis.call('HDEL', K[1], 'failures')
  elseif A[5] == 'f' then
    redis.call('HINCRBY', K[1], 'failures', 1)
  end
  redis.call('HSET', K[1], 'run', tonumber(A[2]) + 1)
  redis.call('ZADD', K[2], A[3], A[4])
  return 1
end
"""

# KEYS: session, subs.  ARGV: owner, subscription id ('' for none).  Drops the session when
# ``owner`` still owns it, and the subscription.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""

# What a finished tracking keeps: once its outcome is recorded and every callback sent,
# ``forget(K)`` (K: outcome, subs, claims, session, status) drops the subscriptions, the
# claims, the session and the cached status with its history, and keeps one key, the
# outcome: the result JSON, then after a newline the ids of the subscriptions it served
# (so that a redelivered registration of one of them is not served twice). The outcome's
# ``status`` is what ``get_status`` answers from then on.
_FORGET_LUA = """
local function outcome_parts(outcome)
  local cut = string.find(outcome, '\\n', 1, true)
  if not cut then return outcome, '' end
  return string.sub(outcome, 1, cut - 1), string.sub(outcome, cut + 1)
end
local function served_ids(tail)
  local served = {}
  for id in string.gmatch(tail, '[^,]+') do served[id] = true end
  return served
end
local function forget(K)
  local outcome = redis.call('GET', K[1])
  if not outcome then return end
  local ids = redis.call('HKEYS', K[3])
  if #ids > 0 then
    local head, tail = outcome_parts(outcome)
    local served = served_ids(tail)
    for _, id in ipairs(ids) do
      if not served[id] then
        tail = (tail == '' and id) or (tail .. ',' .. id)
        served[id] = true
      end
    end
    redis.call('SET', K[1], head .. '\\n' .. tail, 'KEEPTTL')
  end
  redis.call('DEL', K[2], K[3], K[4], K[5])
end
"""

# ``settle(K, A)``: K: outcome, subs, claims, session, due, status; A: result JSON ('' to
# record nothing), ttl ms, claimer, now ms, stale claim ms, due member.
# Records the outcome if none is recorded, then claims every subscription that is not
# dispatched: unclaimed, claimed earlier by this same claimer (its run was interrupted), or
# claimed by another claimer longer ago than the stale claim time (that claimer died).
# While anything is left to dispatch the message stays in the due index, due now: if the
# claimer dies before it marks its dispatch sent, the re-driver hands the claim on.
# A subscription the outcome served before it was forgotten counts as sent. When nothing is
# left to dispatch, what the tracking leaves is cut to its outcome (``forget``).
# Returns {recorded, outcome JSON or '', claimed (id, JSON pairs), retaken ids}.
_SETTLE_LUA = """
local function settle(K, A)
  local outcome = redis.call('GET', K[1])
  local recorded = 0
  local served = {}
  if outcome then
    local tail
    outcome, tail = outcome_parts(outcome)
    served = served_ids(tail)
  else
    if A[1] == '' then return {0, '', {}, {}} end
    outcome = A[1]
    recorded = 1
    redis.call('SET', K[1], outcome, 'PX', A[2])
    if redis.call('EXISTS', K[4]) == 1 then
      redis.call('HSET', K[4], 'finished', '1')
      redis.call('PEXPIRE', K[4], A[2])
    end
  end
  local now = tonumber(A[4])
  local mine = 'pending:' .. A[3] .. ':'
  local claimed = {}
  local retaken = {}
  local unsent = 0
  local subs = redis.call('HGETALL', K[2])
  for i = 1, #subs, 2 do
    local mark = redis.call('HGET', K[3], subs[i])
    if served[subs[i]] then mark = 'sent' end
    local take = false
    if not mark then
      take = true
    elseif string.sub(mark, 1, 8) == 'pending:' then
      local at = tonumber(string.match(mark, ':(%d+)$')) or 0
      take = string.sub(mark, 1, #mine) == mine or now - at > tonumber(A[5])
      unsent = 1
    end
    if take then
      redis.call('HSET', K[3], subs[i], mine .. A[4])
      claimed[#claimed + 1] = subs[i]
      claimed[#claimed + 1] = subs[i + 1]
      if mark then retaken[#retaken + 1] = subs[i] end
    end
  end
  if #subs > 0 then
    redis.call('PEXPIRE', K[2], A[2])
    redis.call('PEXPIRE', K[3], A[2])
  end
  if #claimed > 0 then
    redis.call('ZADD', K[5], now / 1000, A[6])
  elseif unsent == 0 then
    redis.call('ZREM', K[5], A[6])
    forget({K[1], K[2], K[3], K[4], K[6]})
  end
  return {recorded, outcome, claimed, retaken}
end
"""

# The second of a check's two round trips, and the settle step of anyone who finishes a
# tracking.  KEYS: session, status, due, outcome, subs, claims, gate, then the rate limit's
# bucket and pause.  ARGV: owner, run, due member, 'settle' or 'wait', next due score,
# what the run was (reschedule's), count a poll ('1'), mark pushed ('1'), an unknown status to note
# once (''), the emission interval us to give an unused turn back (''), a pause ms (''),
# then settle's result JSON, ttl ms, claimer, now ms, stale ms, then (optional) the
# status to cache (StatusCache.store_args).
# Caches the answer, counts the poll, gives back an unused turn, pauses everyone after a
# 429; then settles (recording the outcome) or reschedules.  Returns {rescheduled (1, or
# 0 when superseded), unknown status new (1/0), paused (1/0), settle's reply or {}}.
_AFTER = (
    STORE_LUA
    + ADJUST_LUA
    + _RESCHEDULE_LUA
    + _FORGET_LUA
    + _SETTLE_LUA
    + """
if #ARGV > 16 then
  local A = {}
  for i = 17, #ARGV do A[#A + 1] = ARGV[i] end
  store({KEYS[2]}, A)
end
local unknown = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'polls', 1) end
  if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'pushed', 1) end
  if ARGV[9] ~= '' then unknown = redis.call('HSETNX', KEYS[1], 'unknown:' .. ARGV[9], 1) end
end
if ARGV[10] ~= '' then
  redis.call('DEL', KEYS[7])
  unreserve({KEYS[8]}, tonumber(ARGV[10]), 1)
end
local paused = 0
if ARGV[11] ~= '' then paused = pause({KEYS[8], KEYS[9]}, tonumber(ARGV[11])) end
if ARGV[4] == 'settle' then
  local done = settle({KEYS[4], KEYS[5], KEYS[6], KEYS[1], KEYS[3], KEYS[2]},
    {ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16], ARGV[3]})
  return {1, unknown, paused, done}
end
local next = reschedule({KEYS[1], KEYS[3]}, {ARGV[1], ARGV[2], ARGV[5], ARGV[3], ARGV[6]})
return {next, unknown, paused, {}}
"""
)

# KEYS: kombu's unacked hash, then queue lists.  ARGV: task ids.  Which of the task ids
# some message in the broker carries (run on the server: the messages never travel).
_IN_BROKER = """
local want, found = {}, {}
for i = 1, #ARGV do want[ARGV[i]] = true end
local function scan(values)
  for _, v in ipairs(values) do
    for id in pairs(want) do
      if string.find(v, id, 1, true) then
        found[#found + 1] = id
        want[id] = nil
      end
    end
  end
end
scan(redis.call('HVALS', KEYS[1]))
for i = 2, #KEYS do scan(redis.call('LRANGE', KEYS[i], 0, -1)) end
return found
"""
# How long a process trusts its copy of which queues tracker workers consume.
QUEUES_CACHE: Final = 5.0

# KEYS: claims, subs, due, outcome, session, status.  ARGV: due member, subscription id.
# Marks a dispatch sent; once every subscription is sent the message leaves the due index,
# and what it leaves is cut to its outcome (``forget``).
_SENT = (
    _FORGET_LUA
    + """
redis.call('HSET', KEYS[1], ARGV[2], 'sent')
local _, tail = outcome_parts(redis.call('GET', KEYS[4]) or '')
local served = served_ids(tail)
for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('HGET', KEYS[1], id) ~= 'sent' and not served[id] then return 0 end
end
redis.call('ZREM', KEYS[3], ARGV[1])
forget({KEYS[4], KEYS[2], KEYS[1], KEYS[5], KEYS[6]})
return 1
"""
)

# KEYS: claims.  ARGV: this claimer's mark prefix, then subscription ids.  Gives back the
# claims of a dispatch that failed, so that the next settle (a provider's retried push, the
# poller, the re-driver) takes them at once.
_RELEASE = """
for i = 2, #ARGV do
  local mark = redis.call('HGET', KEYS[1], ARGV[i])
  if mark and string.sub(mark, 1, #ARGV[1]) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"""


def parse_outcome(raw: str) -> dict[str, Any]:
    """A stored outcome's result (what follows its first line is bookkeeping: the ids of
    the subscriptions it served; see ``_FORGET_LUA``)."""
    result: dict[str, Any] = json.loads(raw.partition("\n")[0])
    return result


def iso(epoch: float | None) -> str | None:
    """ISO-8601 UTC text for an epoch time."""
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Session:
    """A message's tracking session as stored in Redis."""

    message_id: str
    owner: str
    started_at: float
    deadline_at: float
    checks: int = 0
    polls: int = 0
    pushed: bool = False  # a push has been seen for the message: the provider pushes it
    failures: int = 0  # requests failed in a row since the last answer
    # The owner's run (Celery's retries count) the session expects next: with ``owner``, the
    # fencing token. None for a session stored before the tracker had one.
    run: int | None = None

    @property
    def progress(self) -> Progress:
        """What the rules (:func:`~smsbat_tracker.rules.decide.decide`) need of the session."""
        return Progress(self.started_at, self.deadline_at, self.checks, self.pushed, self.failures)


@dataclass(frozen=True, slots=True)
class Subscription:
    """Who wants a message's outcome: the callbacks of one ``track_message`` call.

    ``chain`` and ``links`` are the rest of a Celery chain and link callbacks taken from
    the task request, so that they too run once, with the final result.
    """

    on_delivered: dict[str, Any] | None = None
    on_failed: dict[str, Any] | None = None
    on_timeout: dict[str, Any] | None = None
    chain: list[dict[str, Any]] | None = None
    links: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON: equal subscriptions give equal text, hence equal ids."""
        return json.dumps(
            {
                "on_delivered": self.on_delivered,
                "on_failed": self.on_failed,
                "on_timeout": self.on_timeout,
                "chain": self.chain,
                "links": self.links,
                "extra": self.extra,
            },
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )

    @property
    def id(self) -> str:
        """Content hash of the subscription."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:24]

    @property
    def is_empty(self) -> bool:
        """True when nobody would be told anything."""
        return not (
            self.on_delivered or self.on_failed or self.on_timeout or self.chain or self.links
        )

    @classmethod
    def from_json(cls, raw: str) -> Subscription:
        """Parse :meth:`to_json` output."""
        data = json.loads(raw)
        return cls(
            on_delivered=data.get("on_delivered"),
            on_failed=data.get("on_failed"),
            on_timeout=data.get("on_timeout"),
            chain=data.get("chain"),
            links=data.get("links"),
            extra=data.get("extra") or {},
        )

    def callback_for(self, outcome: str) -> dict[str, Any] | None:
        """The callback an outcome selects."""
        if outcome == DELIVERED:
            return self.on_delivered
        if outcome == "timeout":
            return self.on_timeout
        return self.on_failed


@dataclass(frozen=True, slots=True)
class SettleResult:
    """What :meth:`Engine.settle` did."""

    recorded: bool
    result: dict[str, Any]
    claimed: list[tuple[str, Subscription]]
    # Claims taken over from a claimer that stopped after claiming: perhaps already sent.
    retaken: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Turn:
    """Whether a run may ask the API now, as the before-check script found.

    ``taken``: the gate and a rate-limit token are the run's, the token due in ``wait``
    seconds. Otherwise ``wait`` is how long until asking again makes sense, and ``reason``
    says who turned it away.
    """

    taken: bool
    wait: float
    reason: Literal["gate", "rate"] = "rate"


@dataclass(frozen=True, slots=True)
class Start:
    """What a run learns in its first round trip (:meth:`Engine.start`)."""

    session: Session
    recorded: dict[str, Any] | None  # the outcome, when the tracking has ended
    cached: CachedStatus | None
    turn: Turn | None  # None for a run that may not check (ended, or not the expected run)


@dataclass(frozen=True, slots=True)
class Check:
    """What a run learned, written with its next step in its second round trip."""

    answer: MessageStatus | None = None  # the API's answer: cached
    asked: bool = False  # a request was made (counted as a poll)
    unused_turn: bool = False  # a turn was taken and not used: given back
    pushed: bool = False  # the provider pushes this message's changes: noted
    pause: float | None = None  # a 429's pause for every caller, seconds


def build_result(
    message_id: str,
    outcome: Outcome,
    *,
    status: MessageStatus | None = None,
    source: str | None = None,
    started_at: float | None = None,
    polls: int | None = 0,
    error: str | None = None,
    now: float | None = None,
    campaign_id: str | None = None,
) -> dict[str, Any]:
    """The result dict every callback receives (and ``track_message`` returns).

    One shape for ``track_message`` and campaigns alike; a campaign's adds its
    ``campaign_id``, and its ``polls`` is None (a campaign counts checks, not per message).
    """
    # The outcome first: Flower's task list shows the start of each result.
    result: dict[str, Any] = {"outcome": outcome, "message_id": message_id}
    if campaign_id is not None:
        result["campaign_id"] = campaign_id
    result.update(
        deliverystatus=status.deliverystatus if status else None,
        cost=status.cost if status else None,
        polls=polls,
        started_at=iso(started_at) if started_at is not None else None,
        finished_at=iso(time.time() if now is None else now),
        source=source,
        error=error,
        status=status.to_json_dict() if status else None,
    )
    return result


def routed_queue(
    app: Any, task: str, options: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The queue ``app`` sends ``task`` to with these options, and the route it takes."""
    options = dict(options or {})
    if isinstance(options.get("queue"), str):
        return str(options["queue"]), options
    route = dict(app.amqp.router.route(options, task))
    queue = route.get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue), route


class Engine:
    """Sessions, checks and settlement for one process; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        api: SmsbatClient | None,
        app: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.api = api
        self.app = app
        self.keys = Keys(settings.key_prefix)
        self.cache = StatusCache(redis_client, settings, self.keys)
        self.schedule = Schedule.from_settings(settings)
        self.rules = Rules.from_settings(settings, self.schedule)
        self.limiter = RateLimiter(redis_client, settings, self.keys)
        self._before = redis_client.register_script(_BEFORE)
        self._after_script = redis_client.register_script(_AFTER)
        self._in_broker = redis_client.register_script(_IN_BROKER)
        self._take_turn = redis_client.register_script(_TAKE_TURN)
        self._queues_seen: tuple[float, set[str]] = (0.0, set())
        self._sent = redis_client.register_script(_SENT)
        self._release = redis_client.register_script(_RELEASE)
        self._abandon = redis_client.register_script(_ABANDON)
        self._register = redis_client.register_script(_REGISTER)

    # --- sessions and subscriptions ---------------------------------------------------

    def start(
        self,
        message_id: str,
        *,
        owner: str,
        run: int,
        started_at: float,
        deadline_at: float,
        due_at: float,
    ) -> Start:
        """A run's first round trip: the session, the outcome, the cache and a turn.

        Creates the session (and its due entry) unless one exists, as when the task was
        sent by name. For the run the session expects, while nothing is recorded, it also
        takes a turn to ask the API (:class:`Turn`), waiting at most :data:`CHECK_WAIT`
        for a token, never past the deadline, in the limit's line by ``due_at`` (when the
        run fell due). A run that then does not ask gives it back in :meth:`reschedule`
        or :meth:`settle` (``Check(unused_turn=True)``).
        """
        now = time.time()
        # Never a token past the deadline check's grace.
        ahead = max(0.0, min(CHECK_WAIT, deadline_at + self.rules.deadline_grace - now))
        values, outcome, raw, (turn, wait) = self._before(
            keys=[
                self.keys.session(message_id),
                self.keys.outcome(message_id),
                self.keys.status(message_id),
                self.keys.due(),
                self.keys.poll_gate(message_id),
                *self.limiter.keys,
            ],
            args=[
                *self._open_args(message_id, owner, started_at, deadline_at, now),
                run,
                *self._turn_args(message_id, ahead=ahead, due_at=due_at),
            ],
        )
        session = self._session(message_id, values)
        assert session is not None  # the script creates it
        return Start(
            session,
            json.loads(outcome) if outcome else None,
            StatusCache.parse(raw) if raw else None,
            None if int(turn) == 3 else self._turn(int(turn), int(wait)),
        )

    def _turn_args(self, message_id: str, *, ahead: float, due_at: float | None) -> list[Any]:
        """``take_turn``'s arguments (see ``_TURN_LUA``)."""
        limiter = self.limiter
        return [
            int(self.settings.min_interval * 1000),
            "1" if limiter.enabled else "",
            *limiter.script_args(
                1,
                ahead=ahead,
                # A tracking keeps its place in the limit's line; a one-off caller does not.
                waiter=Keys.due_message(message_id) if due_at is not None else "",
                due_at=due_at,
            ),
        ]

    @staticmethod
    def _turn(code: int, wait: int) -> Turn:
        if code == 2:  # checked by someone else less than the minimum interval ago (ms)
            return Turn(False, max(wait, 1) / 1000, "gate")
        return Turn(bool(code), wait / 1_000_000)

    def reschedule(
        self,
        message_id: str,
        *,
        owner: str,
        run: int,
        next_at: float,
        counted: bool,
        failed: bool = False,
        check: Check | None = None,
    ) -> bool:
        """A run's second round trip when tracking goes on: ``check`` is written (see
        :class:`Check`); the check is recorded (when ``counted``: an answer), or a failed
        request (``failed``), and the owner's next run put in the due index.

        Fenced: False, and no next run, when ``owner``'s run ``run`` is no longer the one
        the session expects (the re-driver took the tracking over, or this is a stale copy
        of the run). The caller then stops without publishing anything.
        """
        done, _ = self._after(
            message_id,
            check,
            [
                owner,
                run,
                Keys.due_message(message_id),
                "wait",
                repr(next_at),
                "1" if counted else "f" if failed else "0",
            ],
            ["", 0, "", 0, 0],
        )
        return bool(done)

    def _after(
        self, message_id: str, check: Check | None, step: list[Any], settle: list[Any]
    ) -> tuple[int, list[Any]]:
        """Run ``_AFTER``: ``step`` is its first six arguments, ``settle`` settle's five."""
        check = check or Check()
        answer = check.answer
        unknown = ""
        if answer is not None and not answer.is_final and answer.deliverystatus not in IN_FLIGHT:
            unknown = answer.deliverystatus[:64]
        pause = check.pause
        args = [
            *step,
            "1" if check.asked else "",
            "1" if check.pushed else "",
            unknown,
            repr(self.limiter.interval_us) if check.unused_turn else "",
            max(1, int(pause * 1000)) if pause is not None else "",
            *settle,
        ]
        if answer is not None:
            args += self.cache.store_args(answer, source="poll")
        bucket, paused_key = self.limiter.keys[0], self.limiter.keys[1]
        done, new_unknown, paused, settled = self._after_script(
            keys=[
                self.keys.session(message_id),
                self.keys.status(message_id),
                self.keys.due(),
                self.keys.outcome(message_id),
                self.keys.subs(message_id),
                self.keys.claims(message_id),
                self.keys.poll_gate(message_id),
                bucket,
                paused_key,
            ],
            args=args,
        )
        if int(new_unknown):
            log.warning("track.unknown_status", message_id=message_id, deliverystatus=unknown)
        if int(paused) and pause is not None:
            log.warning("ratelimit.pause", seconds=round(pause, 3))
        return int(done), list(settled)

    @staticmethod
    def _session(message_id: str, values: Sequence[Any]) -> Session | None:
        owner, started, deadline, checks, polls, pushed, run, failures = values
        if owner is None or started is None or deadline is None:
            return None
        return Session(
            message_id=message_id,
            owner=str(owner),
            started_at=float(started),
            deadline_at=float(deadline),
            checks=int(checks or 0),
            polls=int(polls or 0),
            pushed=bool(pushed),
            failures=int(failures or 0),
            run=None if run is None else int(run),
        )

    def session(self, message_id: str) -> Session | None:
        """The message's session, or None."""
        raw = self.redis.hmget(self.keys.session(message_id), list(_SESSION_FIELDS))
        return self._session(message_id, raw)

    def subscribe(self, message_id: str, subscription: Subscription) -> bool:
        """Register a subscription; False when an equal one was registered already."""
        key = self.keys.subs(message_id)
        added = bool(self.redis.hsetnx(key, subscription.id, subscription.to_json()))
        self.redis.pexpire(key, self._subs_ttl_ms())
        return added

    def _open_args(
        self, message_id: str, owner: str, started_at: float, deadline_at: float, due_at: float
    ) -> list[Any]:
        """The arguments of the session-opening piece (``_OPEN_SESSION``)."""
        return [
            owner,
            repr(started_at),
            repr(deadline_at),
            self._session_ttl_ms(deadline_at),
            repr(due_at),
            Keys.due_message(message_id),
        ]

    def _session_ttl_ms(self, deadline_at: float) -> int:
        # The session outlives its deadline by as long as a final outcome is kept.
        return int((max(deadline_at - time.time(), 0) + self.settings.final_ttl) * 1000)

    def _subs_ttl_ms(self) -> int:
        # Outlives any deadline in practice, and the recorded outcome after it.
        return int((self.settings.deadline * 4 + self.settings.final_ttl) * 1000)

    def register(
        self,
        message_id: str,
        subscription: Subscription,
        *,
        owner: str,
        started_at: float,
        deadline_at: float,
        first_at: float,
    ) -> tuple[Session, bool, CachedStatus | None, bool]:
        """Register a new tracking in one round trip (see ``TrackTask``).

        Subscribes ``subscription`` (unless empty) and opens the session as
        :meth:`subscribe` and :meth:`begin` do, due at ``first_at``. Returns the session in
        force, whether the subscription was new, the cached status, and whether an outcome
        is recorded already.
        """
        values, added, raw, ended = self._register(
            keys=[
                self.keys.session(message_id),
                self.keys.subs(message_id),
                self.keys.status(message_id),
                self.keys.due(),
                self.keys.outcome(message_id),
            ],
            args=[
                *self._open_args(message_id, owner, started_at, deadline_at, first_at),
                "" if subscription.is_empty else subscription.id,
                subscription.to_json(),
                self._subs_ttl_ms(),
            ],
        )
        session = self._session(message_id, values)
        assert session is not None  # the script creates it
        return session, bool(added), StatusCache.parse(raw) if raw else None, bool(ended)

    def abandon(self, message_id: str, *, owner: str, subscription: str | None) -> None:
        """Undo a registration whose task was never published (see ``TrackTask``)."""
        self._abandon(
            keys=[self.keys.session(message_id), self.keys.subs(message_id)],
            args=[owner, subscription or ""],
        )

    def outcome(self, message_id: str) -> dict[str, Any] | None:
        """The recorded final result, or None while tracking goes on."""
        raw = self.redis.get(self.keys.outcome(message_id))
        return parse_outcome(str(raw)) if raw else None

    def final_status(self, message_id: str) -> MessageStatus | None:
        """The final status a finished tracking kept in its outcome, if it has one."""
        result = self.outcome(message_id)
        raw = result.get("status") if result else None
        if not isinstance(raw, dict):
            return None
        try:
            status = MessageStatus.model_validate(raw)
        except ValueError:
            return None
        return status if status.is_final else None

    # --- checking -----------------------------------------------------------------------

    def require_api(self) -> SmsbatClient:
        """The API client; :class:`ConfigError` naming SMSBAT_API_KEY in a process built
        without credentials (the webhook receiver, or one that only enqueues)."""
        if self.api is None:
            raise ConfigError(f"invalid settings: {NO_CREDENTIALS}")
        return self.api

    def ask(self, message_id: str, turn: Turn) -> MessageStatus:
        """Ask the API for the status with a ``turn`` taken for it.

        Raises :class:`TryLater` when the turn was not taken (the caller waits and comes
        back), after sleeping until the token is due otherwise; raises the client's
        :mod:`~smsbat_tracker.errors` too. Caches nothing: the caller's next step does.
        """
        if not turn.taken:
            if turn.reason == "rate":
                metrics.get().rate_waits.labels("deferred").inc()
            raise TryLater(turn.wait, turn.reason)
        if turn.wait > 0:
            metrics.get().rate_waits.labels("slept").inc()
            time.sleep(turn.wait)
        return self.require_api().get_status(message_id)

    def poll(self, message_id: str) -> MessageStatus:
        """One status request for a one-off caller, through the gate and the global rate
        limit (waiting at most :data:`CHECK_WAIT` for a token), cached.

        Raises :class:`TryLater` when it may not ask now, and the client's
        :mod:`~smsbat_tracker.errors`.
        """
        validate_message_id(message_id)
        code, wait = self._take_turn(
            keys=[self.keys.poll_gate(message_id), *self.limiter.keys],
            args=self._turn_args(message_id, ahead=CHECK_WAIT, due_at=None),
        )
        try:
            status = self.ask(message_id, self._turn(int(code), int(wait)))
        except SmsbatError as exc:
            self.limiter.observe_error(exc)
            raise
        self.cache.store(message_id, status, source="poll")
        return status

    def get_status(self, message_id: str) -> MessageStatus:
        """The message's status, from the cache while fresh, else from the API.

        When another caller checked the message within the last interval, waits for the
        gate and reads what that caller cached instead of calling the API again. A
        finished tracking answers with the final status its outcome kept. Raises
        :class:`~smsbat_tracker.errors.RateLimited` when the global rate limit has no
        token within ``SMSBAT_READ_TIMEOUT``.
        """
        validate_message_id(message_id)
        give_up = time.monotonic() + self.settings.min_interval + self.settings.read_timeout
        while True:
            cached = self.cache.get(message_id)
            if cached is not None:
                return cached.status
            final = self.final_status(message_id)
            if final is not None:
                return final
            try:
                return self.poll(message_id)
            except TryLater as later:
                if time.monotonic() > give_up:
                    if later.reason == "rate":
                        raise RateLimited(
                            later.retry_in, "the global SMSBAT_RATE_LIMIT has no token left"
                        ) from None
                    raise RequestTimeout(
                        "another check of this message produced no status in time"
                    ) from None
                time.sleep(min(later.retry_in, 0.25))

    # --- settling ------------------------------------------------------------------------

    def settle(
        self,
        message_id: str,
        result: Mapping[str, Any] | None,
        *,
        claimer: str,
        check: Check | None = None,
    ) -> SettleResult:
        """Record ``result`` unless an outcome is recorded; claim and dispatch callbacks.

        With ``result=None`` nothing new is recorded: only pending subscriptions of an
        already recorded outcome are claimed (a late joiner, or a dispatch to finish).
        A run that ends its tracking writes its ``check`` in the same round trip.
        """
        _, reply = self._after(
            message_id,
            check,
            ["", 0, Keys.due_message(message_id), "settle", 0, 0],
            [
                json.dumps(result, separators=(",", ":")) if result is not None else "",
                int(self.settings.final_ttl * 1000),
                claimer,
                int(time.time() * 1000),
                # A claim this old belongs to a claimer that died: as late as a lost run.
                int(self.settings.redrive_after * 1000),
            ],
        )
        recorded, outcome_raw, flat, retaken = reply
        if not outcome_raw:  # result None and nothing recorded: nothing to do
            return SettleResult(False, {}, [])
        final: dict[str, Any] = json.loads(outcome_raw)
        claimed = [
            (str(flat[i]), Subscription.from_json(str(flat[i + 1]))) for i in range(0, len(flat), 2)
        ]
        settled = SettleResult(bool(recorded), final, claimed, frozenset(map(str, retaken)))
        if settled.recorded:
            metrics.get().outcome(final, now=time.time())
            log.info(
                "track.final",
                message_id=message_id,
                outcome=final["outcome"],
                deliverystatus=final.get("deliverystatus"),
                polls=final.get("polls"),
            )
        self.dispatch(message_id, settled, claimer=claimer)
        return settled

    def dispatch(self, message_id: str, settled: SettleResult, *, claimer: str) -> None:
        """Send the callbacks of the subscriptions ``settled`` claimed, marking each sent.

        When a send fails, the claims not yet sent are given back before the error is
        raised, so that the next settle takes them at once.
        """
        if not settled.claimed:
            return
        from celery import signature

        result = settled.result
        outcome = str(result["outcome"])
        member = Keys.due_message(message_id)
        # One id per follow-up of this tracking (a later tracking of the same id differs).
        session_key = f"{message_id}@{result.get('started_at')}"
        sent_keys = [
            self.keys.claims(message_id),
            self.keys.subs(message_id),
            self.keys.due(),
            self.keys.outcome(message_id),
            self.keys.session(message_id),
            self.keys.status(message_id),
        ]
        done = 0
        try:
            for sub_id, sub in settled.claimed:
                sends: list[tuple[Signature[Any], str, dict[str, Any]]] = []
                callback = sub.callback_for(outcome)
                if callback:
                    sig = signature(callback, app=self.app)
                    sends.append((sig, self.keys.dispatch_id(session_key, sub_id), {}))
                    log.info(
                        "track.callback",
                        message_id=message_id,
                        outcome=outcome,
                        callback=sig.task,
                        subscription=sub_id,
                    )
                for n, link in enumerate(sub.links or ()):
                    task_id = self.keys.dispatch_id(session_key, sub_id, f"link{n}")
                    sends.append((signature(link, app=self.app), task_id, {}))
                if sub.chain:
                    # As Celery itself continues a chain: the last entry is the next step.
                    task_id = self.keys.dispatch_id(session_key, sub_id, "chain")
                    chain = {"chain": sub.chain[:-1] or None}
                    sends.append((signature(sub.chain[-1], app=self.app), task_id, chain))
                self.send_once(sends, result, maybe_sent=sub_id in settled.retaken)
                self._sent(keys=sent_keys, args=[member, sub_id])
                done += 1
        except BaseException:
            left = [sub_id for sub_id, _ in settled.claimed[done:]]
            try:
                self._release(
                    keys=[self.keys.claims(message_id)], args=[f"pending:{claimer}:", *left]
                )
            except redis.RedisError:  # the stale-claim time hands them on instead
                log.warning("track.release_failed", message_id=message_id)
            raise

    def send_once(
        self,
        sends: Sequence[tuple[Signature[Any], str, dict[str, Any]]],
        result: Mapping[str, Any],
        *,
        maybe_sent: bool,
    ) -> None:
        """Publish each ``(signature, task id, options)`` with ``result`` as its argument.

        ``maybe_sent``: a claimer that stopped before marking these sent may have sent
        them. Those still in the broker (queued, or held by a worker, even a dead one whose
        tasks the re-driver gives back) are not sent again; only the rest are. One that
        already ran and was acknowledged cannot be told from one never sent, and is sent
        again, with the same task id.
        """
        present: set[str] = set()
        if maybe_sent and sends:
            present = self.in_broker([task_id for _, task_id, _ in sends], [s for s, _, _ in sends])
        now = time.time()
        watched = self._watched_queues(now)
        todo = [send for send in sends if send[1] not in present]
        for _, task_id, _ in sends:
            if task_id in present:
                log.info("track.already_sent", task_id=task_id)
        # Kombu's Redis transport pops a message before the worker notes it: one killed in
        # between loses it. A follow-up to a queue tracker workers consume is noted before
        # it is sent (a worker may receive it at once) and kept until one receives it.
        noted = [
            (sig, task_id, options)
            for sig, task_id, options in todo
            if watched and self._queue_of(sig) in watched
        ]
        if noted:
            pipe = self.redis.pipeline(transaction=False)
            for sig, task_id, options in noted:
                send = {"sig": dict(sig), "result": dict(result), "options": options, "n": 0}
                pipe.zadd(self.keys.unreceived(), {task_id: now})
                pipe.hset(self.keys.unreceived_sends(), task_id, json.dumps(send, default=str))
            pipe.execute()
        done = 0
        try:
            for sig, task_id, options in todo:
                sig.apply_async((dict(result),), task_id=task_id, **options)
                done += 1
        except BaseException:
            unsent = [task_id for _, task_id, _ in todo[done:]]
            if noted and unsent:
                with contextlib.suppress(redis.RedisError):
                    self.redis.zrem(self.keys.unreceived(), *unsent)
                    self.redis.hdel(self.keys.unreceived_sends(), *unsent)
            raise

    def _watched_queues(self, now: float) -> set[str]:
        """The queues tracker workers consume (they confirm receipts), cached briefly."""
        at, queues = self._queues_seen
        if now - at > QUEUES_CACHE:
            live = now - QUEUES_CACHE - 2 * self.settings.redrive_after
            raw = self.redis.hgetall(self.keys.worker_queues())
            queues = {str(q) for q, seen in raw.items() if float(seen) > live}
            self._queues_seen = (now, queues)
        return queues

    def in_broker(self, task_ids: Sequence[str], sigs: Sequence[Signature[Any]]) -> set[str]:
        """Which of ``task_ids`` the broker holds: in their queues, or unacknowledged."""
        keys = [self.unacked_key()]
        for sig in sigs:
            queue = self._queue_of(sig)
            keys += [kombu_queue_list(queue, p) for p in KOMBU_PRIORITY_STEPS]
        found = self._in_broker(keys=list(dict.fromkeys(keys)), args=list(task_ids))
        return {str(x) for x in found}

    def _queue_of(self, sig: Signature[Any]) -> str:
        options = sig.options or {}
        if self.app is None and not isinstance(options.get("queue"), str):
            return "celery"
        return routed_queue(self.app, str(sig.task), options)[0]

    def unacked_key(self) -> str:
        """Kombu's hash of fetched, unacknowledged messages on this app's broker."""
        return kombu_unacked_key(self.app.conf.broker_transport_options if self.app else None)

    def forget(self, message_ids: Sequence[str]) -> None:
        """Delete everything stored about these messages (tests, re-tracking by hand)."""
        keys = []
        for m in message_ids:
            k = self.keys
            keys += [k.status(m), k.session(m), k.subs(m), k.claims(m), k.outcome(m)]
        if keys:
            self.redis.delete(*keys)
