"""The tracking engine: sessions, status checks, and the exactly-once final outcome.

Celery tasks (:mod:`smsbat_tracker.tasks`) and the webhook call into :class:`Engine`; it
holds no state of its own beyond connections, so one per process serves every task.

Per message, Redis holds (see :mod:`smsbat_tracker.keys`):

- a *session* hash: the owner task id (the one poller), start and deadline, counters;
- *subscriptions*: each distinct set of callbacks (and captured chain) asking for the
  outcome; the same set enqueued twice is one subscription;
- the *outcome*: written once with SET NX semantics inside a Lua script that also claims
  every subscription not yet dispatched. Only the caller that claims a subscription
  dispatches its callback, so a duplicate enqueue, a redelivered task or a webhook racing
  the poller never fires a callback twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import redis

from smsbat_tracker.backoff import Schedule
from smsbat_tracker.cache import CachedStatus, StatusCache
from smsbat_tracker.client import SmsbatClient
from smsbat_tracker.config import Settings
from smsbat_tracker.errors import RateLimited, RequestTimeout
from smsbat_tracker.keys import Keys
from smsbat_tracker.log import get_logger
from smsbat_tracker.models import DELIVERED, FAILED_STATUSES, MessageStatus, validate_message_id
from smsbat_tracker.ratelimit import RESERVE_AHEAD, RateLimiter

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "OUTCOMES",
    "Engine",
    "Outcome",
    "Session",
    "SettleResult",
    "Subscription",
    "TryLater",
    "build_result",
    "iso",
]

Outcome = Literal["delivered", "undeliverable", "permanenterror", "timeout", "error"]
OUTCOMES: Final[tuple[str, ...]] = (
    "delivered",
    "undeliverable",
    "permanenterror",
    "timeout",
    "error",
)

# A dispatch claimed but never confirmed (the claimer died) may be re-claimed after this.
STALE_CLAIM_MS: Final = 60_000

log = get_logger(__name__)

# KEYS: track.  ARGV: owner, started_at, deadline_at, ttl ms.
# Creates the session if absent; returns its owner, started_at, deadline_at, checks, polls,
# pushed.
_OPEN_SESSION = """
if redis.call('HSETNX', KEYS[1], 'owner', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2], 'deadline_at', ARGV[3])
  redis.call('HSET', KEYS[1], 'checks', 0, 'polls', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local session = redis.call('HMGET', KEYS[1], 'owner', 'started_at', 'deadline_at', 'checks',
                           'polls', 'pushed')
"""
_OPEN = _OPEN_SESSION + "return session\n"

# KEYS: track, subs, status.  ARGV: as _OPEN, then subscription id ('' for none), its JSON,
# subs ttl ms.  A new tracking's whole registration in one round trip: the subscription
# (HSETNX), the session (as _OPEN), and the cached status.
_REGISTER = (
    """
local added = 0
if ARGV[5] ~= '' then
  added = redis.call('HSETNX', KEYS[2], ARGV[5], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
"""
    + _OPEN_SESSION
    + """
return {session, added, redis.call('GET', KEYS[3])}
"""
)

# KEYS: track, subs.  ARGV: owner, subscription id ('' for none).  Drops the session when
# ``owner`` still owns it, and the subscription.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: outcome, subs, fired, track.  ARGV: result JSON ('' to record nothing), ttl ms,
# claimer, now ms, stale claim ms.
# Records the outcome if none is recorded, then claims every subscription that is not
# dispatched: unmarked, claimed earlier by this same claimer (its run was interrupted), or
# claimed by another claimer longer ago than STALE_CLAIM_MS (that claimer died).
_SETTLE = """
local outcome = redis.call('GET', KEYS[1])
local recorded = 0
if not outcome then
  if ARGV[1] == '' then return {0, '', {}} end
  outcome = ARGV[1]
  recorded = 1
  redis.call('SET', KEYS[1], outcome, 'PX', ARGV[2])
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HSET', KEYS[4], 'finished', '1')
    redis.call('PEXPIRE', KEYS[4], ARGV[2])
  end
end
local now = tonumber(ARGV[4])
local mine = 'pending:' .. ARGV[3] .. ':'
local claimed = {}
local subs = redis.call('HGETALL', KEYS[2])
for i = 1, #subs, 2 do
  local mark = redis.call('HGET', KEYS[3], subs[i])
  local take = false
  if not mark then
    take = true
  elseif string.sub(mark, 1, 8) == 'pending:' then
    local at = tonumber(string.match(mark, ':(%d+)$')) or 0
    take = string.sub(mark, 1, #mine) == mine or now - at > tonumber(ARGV[5])
  end
  if take then
    redis.call('HSET', KEYS[3], subs[i], mine .. ARGV[4])
    claimed[#claimed + 1] = subs[i]
    claimed[#claimed + 1] = subs[i + 1]
  end
end
if #subs > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return {recorded, outcome, claimed}
"""


def iso(epoch: float | None) -> str | None:
    """ISO-8601 UTC text for an epoch time."""
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class TryLater(Exception):
    """No status request now: wait ``retry_in`` s.

    ``reason`` is ``"gate"`` (the message was checked less than the minimum interval ago)
    or ``"rate"`` (the global rate limit has no token in time).
    """

    def __init__(self, retry_in: float, reason: Literal["gate", "rate"] = "gate") -> None:
        super().__init__(f"no request now ({reason}); retry in {retry_in:.3f} s")
        self.retry_in = retry_in
        self.reason = reason


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


def outcome_of(status: MessageStatus) -> Outcome:
    """The outcome a final status means."""
    if status.deliverystatus == DELIVERED:
        return "delivered"
    if status.deliverystatus in FAILED_STATUSES:
        return status.deliverystatus  # type: ignore[return-value]
    raise ValueError(f"{status.deliverystatus!r} is not final")


def build_result(
    message_id: str,
    outcome: Outcome,
    *,
    session: Session | None,
    cached: CachedStatus | None,
    error: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The result dict every callback receives (and ``track_message`` returns)."""
    status = cached.status if cached else None
    return {
        "message_id": message_id,
        "outcome": outcome,
        "deliverystatus": status.deliverystatus if status else None,
        "cost": status.cost if status else None,
        "polls": session.polls if session else 0,
        "started_at": iso(session.started_at) if session else None,
        "finished_at": iso(time.time() if now is None else now),
        "source": cached.source if cached else None,
        "error": error,
        "status": status.to_json_dict() if status else None,
    }


class Engine:
    """Sessions, checks and settlement for one process; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        api: SmsbatClient,
        app: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.api = api
        self.app = app
        self.keys = Keys(settings.key_prefix)
        self.cache = StatusCache(redis_client, settings, self.keys)
        self.schedule = Schedule.from_settings(settings)
        self.limiter = RateLimiter(redis_client, settings, self.keys)
        self._open = redis_client.register_script(_OPEN)
        self._settle = redis_client.register_script(_SETTLE)
        self._abandon = redis_client.register_script(_ABANDON)
        self._register = redis_client.register_script(_REGISTER)

    # --- sessions and subscriptions ---------------------------------------------------

    def open_session(
        self, message_id: str, *, owner: str, started_at: float, deadline_at: float
    ) -> Session:
        """Create the message's session unless one exists; return the session in force."""
        values = self._open(
            keys=[self.keys.track(message_id)],
            args=[owner, repr(started_at), repr(deadline_at), self._session_ttl_ms(deadline_at)],
        )
        session = self._session(message_id, values)
        assert session is not None  # the script creates it
        return session

    @staticmethod
    def _session(message_id: str, values: Sequence[Any]) -> Session | None:
        owner, started, deadline, checks, polls, pushed = values
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
        )

    def session(self, message_id: str) -> Session | None:
        """The message's session, or None."""
        fields = ["owner", "started_at", "deadline_at", "checks", "polls", "pushed"]
        return self._session(message_id, self.redis.hmget(self.keys.track(message_id), fields))

    def mark_pushed(self, message_id: str) -> None:
        """Note that the provider pushes this message's statuses (see ``trust_pushes``)."""
        self.redis.hset(self.keys.track(message_id), "pushed", 1)

    def subscribe(self, message_id: str, subscription: Subscription) -> bool:
        """Register a subscription; False when an equal one was registered already."""
        key = self.keys.subs(message_id)
        added = bool(self.redis.hsetnx(key, subscription.id, subscription.to_json()))
        self.redis.pexpire(key, self._subs_ttl_ms())
        return added

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
    ) -> tuple[Session, bool, CachedStatus | None]:
        """Register a new tracking in one round trip (see ``TrackTask``).

        Subscribes ``subscription`` (unless empty) and opens the session as
        :meth:`subscribe` and :meth:`open_session` do. Returns the session in force, whether
        the subscription was new, and the cached status.
        """
        values, added, raw = self._register(
            keys=[
                self.keys.track(message_id),
                self.keys.subs(message_id),
                self.keys.status(message_id),
            ],
            args=[
                owner,
                repr(started_at),
                repr(deadline_at),
                self._session_ttl_ms(deadline_at),
                "" if subscription.is_empty else subscription.id,
                subscription.to_json(),
                self._subs_ttl_ms(),
            ],
        )
        session = self._session(message_id, values)
        assert session is not None  # the script creates it
        return session, bool(added), StatusCache.parse(raw) if raw else None

    def abandon(self, message_id: str, *, owner: str, subscription: str | None) -> None:
        """Undo a registration whose task was never published (see ``TrackTask``)."""
        self._abandon(
            keys=[self.keys.track(message_id), self.keys.subs(message_id)],
            args=[owner, subscription or ""],
        )

    def outcome(self, message_id: str) -> dict[str, Any] | None:
        """The recorded final result, or None while tracking goes on."""
        raw = self.redis.get(self.keys.outcome(message_id))
        return json.loads(raw) if raw else None

    def count_check(self, message_id: str) -> None:
        """Count one check (API or cache) of the session; the backoff grows with it."""
        self.redis.hincrby(self.keys.track(message_id), "checks", 1)

    def note_unknown_status(self, message_id: str, status: str) -> bool:
        """True the first time this unknown status is seen for the message (log it once)."""
        return bool(self.redis.hsetnx(self.keys.track(message_id), f"unknown:{status[:64]}", 1))

    # --- checking -----------------------------------------------------------------------

    def open_gate(self, message_id: str) -> None:
        """Take the per-message minimum-interval gate or raise :class:`TryLater`.

        Shared by every worker and process: the first caller in each interval wins.
        """
        key = self.keys.poll_gate(message_id)
        interval_ms = int(self.settings.min_interval * 1000)
        if not self.redis.set(key, 1, px=interval_ms, nx=True):
            left = self.redis.pttl(key)
            raise TryLater(max(int(left), 1) / 1000 if left and int(left) > 0 else 0.05)

    def poll(
        self, message_id: str, *, for_session: bool = True, not_after: float | None = None
    ) -> MessageStatus:
        """One status request through the gate and the global rate limit, cached.

        Waits at most :data:`~smsbat_tracker.ratelimit.RESERVE_AHEAD` for a token, and
        never past ``not_after`` (epoch); otherwise raises :class:`TryLater` rather than
        hold the worker. Raises the client's :mod:`~smsbat_tracker.errors` too.
        """
        validate_message_id(message_id)
        self.open_gate(message_id)
        ahead = RESERVE_AHEAD
        if not_after is not None:
            ahead = max(0.0, min(ahead, not_after - time.time()))
        booked, wait = self.limiter.reserve(1, ahead=ahead)
        if not booked:
            raise TryLater(wait, "rate")
        if wait > 0:
            time.sleep(wait)
        if for_session:
            self.redis.hincrby(self.keys.track(message_id), "polls", 1)
        try:
            status = self.api.get_status(message_id)
        except Exception as exc:
            self.limiter.observe_error(exc)
            raise
        self.cache.store(message_id, status, source="poll")
        return status

    def get_status(self, message_id: str) -> MessageStatus:
        """The message's status, from the cache while fresh, else from the API.

        When another caller checked the message within the last interval, waits for the
        gate and reads what that caller cached instead of calling the API again. Raises
        :class:`~smsbat_tracker.errors.RateLimited` when the global rate limit has no
        token within ``SMSBAT_READ_TIMEOUT``.
        """
        validate_message_id(message_id)
        give_up = time.monotonic() + self.settings.min_interval + self.settings.read_timeout
        while True:
            cached = self.cache.get(message_id)
            if cached is not None:
                return cached.status
            try:
                return self.poll(message_id, for_session=False)
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
        self, message_id: str, result: Mapping[str, Any] | None, *, claimer: str
    ) -> SettleResult:
        """Record ``result`` unless an outcome is recorded; claim and dispatch callbacks.

        With ``result=None`` nothing new is recorded: only pending subscriptions of an
        already recorded outcome are claimed (a late joiner, or a dispatch to finish).
        """
        ttl_ms = int(self.settings.final_ttl * 1000)
        recorded, outcome_raw, flat = self._settle(
            keys=[
                self.keys.outcome(message_id),
                self.keys.subs(message_id),
                self.keys.fired(message_id),
                self.keys.track(message_id),
            ],
            args=[
                json.dumps(result, separators=(",", ":")) if result is not None else "",
                ttl_ms,
                claimer,
                int(time.time() * 1000),
                STALE_CLAIM_MS,
            ],
        )
        if not outcome_raw:  # result None and nothing recorded: nothing to do
            return SettleResult(False, {}, [])
        final: dict[str, Any] = json.loads(outcome_raw)
        claimed = [
            (str(flat[i]), Subscription.from_json(str(flat[i + 1]))) for i in range(0, len(flat), 2)
        ]
        settled = SettleResult(bool(recorded), final, claimed)
        if settled.recorded:
            log.info(
                "track.final",
                message_id=message_id,
                outcome=final["outcome"],
                deliverystatus=final.get("deliverystatus"),
                polls=final.get("polls"),
            )
        self.dispatch(message_id, settled)
        return settled

    def dispatch(self, message_id: str, settled: SettleResult) -> None:
        """Send the callbacks of the subscriptions ``settled`` claimed, then mark them sent."""
        if not settled.claimed:
            return
        from celery import signature

        result = settled.result
        outcome = str(result["outcome"])
        for sub_id, sub in settled.claimed:
            callback = sub.callback_for(outcome)
            if callback:
                sig = signature(callback, app=self.app)
                sig.apply_async((result,))
                log.info(
                    "track.callback",
                    message_id=message_id,
                    outcome=outcome,
                    callback=sig.task,
                    subscription=sub_id,
                )
            for link in sub.links or ():
                signature(link, app=self.app).apply_async((result,))
            if sub.chain:
                # As Celery itself continues a chain: the last entry is the next step.
                nxt = signature(sub.chain[-1], app=self.app)
                nxt.apply_async((result,), chain=sub.chain[:-1] or None)
            self.redis.hset(self.keys.fired(message_id), sub_id, "sent")

    def forget(self, message_ids: Sequence[str]) -> None:
        """Delete everything stored about these messages (tests, re-tracking by hand)."""
        keys = []
        for m in message_ids:
            k = self.keys
            keys += [k.status(m), k.track(m), k.subs(m), k.fired(m), k.outcome(m)]
        if keys:
            self.redis.delete(*keys)
