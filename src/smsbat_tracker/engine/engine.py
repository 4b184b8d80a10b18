"""The tracking engine: the one object the faces hold, composed of a tracking's parts.

The Celery tasks (:mod:`smsbat_tracker.celery.track` and ``campaigns``, through
:func:`~smsbat_tracker.engine.run.run_check`), the re-driver, campaigns and the webhook
call into :class:`Engine`; it holds no state of its own beyond connections, so one per
process serves every task. Its parts, one concept each: :class:`Sessions` (register, read,
undo), :class:`Checks` (a check's two round trips, one-off reads), :class:`Settler`
(record the outcome once, claim the callbacks), :class:`Dispatcher` (send each once) and
:class:`Broker` (what the broker holds).

Every in-flight tracking has an entry in the *due index* (see
:mod:`smsbat_tracker.celery.redrive`), written by the same scripts that record each check
and each dispatch, so that a lost run is re-driven.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.broker import Broker
from smsbat_tracker.engine.check import Check, Checks, Start, Turn
from smsbat_tracker.engine.dispatch import Dispatcher
from smsbat_tracker.engine.session import Session, SettleResult, Subscription
from smsbat_tracker.engine.sessions import Sessions
from smsbat_tracker.engine.settle import Settler
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.decide import Rules
from smsbat_tracker.rules.schedule import Schedule
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.ratelimit import RateLimiter

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

__all__ = ["Engine"]


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
        # The jitter's draws. The OS's randomness: a generator seeded before a prefork
        # worker forks would draw the same jitter in every child.
        self.rng = random.SystemRandom()
        self.limiter = RateLimiter(redis_client, settings, self.keys)
        self.sessions = Sessions(settings, redis_client, self.keys)
        self.checks = Checks(
            settings,
            redis_client,
            self.keys,
            sessions=self.sessions,
            cache=self.cache,
            limiter=self.limiter,
            rules=self.rules,
            api=api,
        )
        self.broker = Broker(redis_client, app)
        self.dispatcher = Dispatcher(settings, redis_client, self.keys, self.broker, app)
        self.settler = Settler(settings, self.checks, self.dispatcher)

    # --- sessions and subscriptions (Sessions) -------------------------------------------

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
        """Register a new tracking in one round trip; see :meth:`Sessions.register`."""
        return self.sessions.register(
            message_id,
            subscription,
            owner=owner,
            started_at=started_at,
            deadline_at=deadline_at,
            first_at=first_at,
        )

    def subscribe(self, message_id: str, subscription: Subscription) -> bool:
        """Register a subscription; False when an equal one was registered already."""
        return self.sessions.subscribe(message_id, subscription)

    def abandon(self, message_id: str, *, owner: str, subscription: str | None) -> None:
        """Undo a registration whose task was never published (see ``TrackTask``)."""
        self.sessions.abandon(message_id, owner=owner, subscription=subscription)

    def session(self, message_id: str) -> Session | None:
        """The message's session, or None."""
        return self.sessions.session(message_id)

    def outcome(self, message_id: str) -> dict[str, Any] | None:
        """The recorded final result, or None while tracking goes on."""
        return self.sessions.outcome(message_id)

    def final_status(self, message_id: str) -> MessageStatus | None:
        """The final status a finished tracking kept in its outcome, if it has one."""
        return self.sessions.final_status(message_id)

    def forget(self, message_ids: Sequence[str]) -> None:
        """Delete everything stored about these messages (tests, re-tracking by hand)."""
        self.sessions.forget(message_ids)

    # --- checking (Checks) ---------------------------------------------------------------

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
        """A run's first round trip; see :meth:`Checks.start`."""
        return self.checks.start(
            message_id,
            owner=owner,
            run=run,
            started_at=started_at,
            deadline_at=deadline_at,
            due_at=due_at,
        )

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
        why: str = "",
    ) -> bool:
        """A run's second round trip when tracking goes on, fenced; see
        :meth:`Checks.reschedule`."""
        return self.checks.reschedule(
            message_id,
            owner=owner,
            run=run,
            next_at=next_at,
            counted=counted,
            failed=failed,
            check=check,
            why=why,
        )

    def require_api(self) -> SmsbatClient:
        """The API client; :class:`~smsbat_tracker.errors.ConfigError` without one."""
        return self.checks.require_api()

    def ask(self, message_id: str, turn: Turn, *, late: bool = False) -> MessageStatus:
        """Ask the API with a ``turn`` taken for it; see :meth:`Checks.ask`."""
        return self.checks.ask(message_id, turn, late=late)

    def poll(self, message_id: str) -> MessageStatus:
        """One status request for a one-off caller; see :meth:`Checks.poll`."""
        return self.checks.poll(message_id)

    def get_status(self, message_id: str) -> MessageStatus:
        """The message's status, cached or asked for; see :meth:`Checks.get_status`."""
        return self.checks.get_status(message_id)

    # --- settling and dispatch (Settler, Dispatcher, Broker) -----------------------------

    def settle(
        self,
        message_id: str,
        result: Mapping[str, Any] | None,
        *,
        claimer: str,
        check: Check | None = None,
    ) -> SettleResult:
        """Record ``result`` unless an outcome is recorded; claim and dispatch callbacks.
        See :meth:`Settler.settle`."""
        return self.settler.settle(message_id, result, claimer=claimer, check=check)

    def dispatch(self, message_id: str, settled: SettleResult, *, claimer: str) -> None:
        """Send the callbacks ``settled`` claimed; see :meth:`Dispatcher.dispatch`."""
        self.dispatcher.dispatch(message_id, settled, claimer=claimer)

    def send_once(
        self,
        sends: Sequence[tuple[Signature[Any], str, dict[str, Any]]],
        result: Mapping[str, Any],
        *,
        maybe_sent: bool,
    ) -> None:
        """Publish each follow-up once; see :meth:`Dispatcher.send_once`."""
        self.dispatcher.send_once(sends, result, maybe_sent=maybe_sent)

    def in_broker(self, task_ids: Sequence[str], sigs: Sequence[Signature[Any]]) -> set[str]:
        """Which of ``task_ids`` the broker holds: in their queues, or unacknowledged."""
        return self.broker.in_broker(task_ids, sigs)

    def unacked_key(self) -> str:
        """Kombu's hash of fetched, unacknowledged messages on this app's broker."""
        return self.broker.unacked_key()

    def unacked_index_key(self) -> str:
        """Kombu's sorted set of when each unacknowledged message was fetched."""
        return self.broker.unacked_index_key()
