"""A tracking's session and subscriptions in Redis: register, read, undo, forget.

The session is opened once, by the enqueue's registration (:meth:`Sessions.register`), or
by the first run of a task sent by name (the before-check,
:meth:`~smsbat_tracker.engine.check.Checks.start`); both open it the same way
(``store/lua/lib/session.lua``), and both read it back in :data:`SESSION_FIELDS` order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.session import Session, Subscription, parse_outcome
from smsbat_tracker.provider.models import MessageStatus
from smsbat_tracker.rules.seen import CachedStatus
from smsbat_tracker.store.cache import StatusCache
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.session_scripts import (
    RETRY_REASONS,
    SESSION_FIELDS,
    AbandonSession,
    RegisterSession,
    SessionOpening,
)

__all__ = ["Sessions"]


class Sessions:
    """Sessions, subscriptions and recorded outcomes of one process's trackings."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys) -> None:
        self._settings = settings
        self._redis = client
        self._keys = keys
        self.register_script = RegisterSession(client)
        self._abandon = AbandonSession(client)

    @staticmethod
    def parse(message_id: str, values: Sequence[Any]) -> Session | None:
        """A session from its :data:`SESSION_FIELDS`' values; None when there is none."""
        owner, started, deadline, checks, polls, pushed, run, failures, *whys = values
        if owner is None or started is None or deadline is None:
            return None
        retries = {k: int(n) for k, n in zip(RETRY_REASONS, whys, strict=True) if n}
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
            retries=retries,
        )

    def opening(
        self, message_id: str, owner: str, started_at: float, deadline_at: float, due_at: float
    ) -> SessionOpening:
        """The session to open when the message has none, due first at ``due_at``."""
        return SessionOpening(
            owner=owner,
            started_at=started_at,
            deadline_at=deadline_at,
            # The session outlives its deadline by as long as a final outcome is kept.
            ttl_ms=int((max(deadline_at - time.time(), 0) + self._settings.final_ttl) * 1000),
            due_at=due_at,
            due_member=Keys.due_message(message_id),
        )

    def _subs_ttl_ms(self) -> int:
        # Outlives any deadline in practice, and the recorded outcome after it.
        return int((self._settings.deadline * 4 + self._settings.final_ttl) * 1000)

    def session(self, message_id: str) -> Session | None:
        """The message's session, or None."""
        raw = self._redis.hmget(self._keys.session(message_id), list(SESSION_FIELDS))
        return self.parse(message_id, raw)

    def subscribe(self, message_id: str, subscription: Subscription) -> bool:
        """Register a subscription; False when an equal one was registered already."""
        key = self._keys.subs(message_id)
        added = bool(self._redis.hsetnx(key, subscription.id, subscription.to_json()))
        self._redis.pexpire(key, self._subs_ttl_ms())
        return added

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
        :meth:`subscribe` and the before-check do, due at ``first_at``. Returns the session
        in force, whether the subscription was new, the cached status, and whether an
        outcome is recorded already.
        """
        keys = self._keys
        registered = self.register_script(
            session=keys.session(message_id),
            subs=keys.subs(message_id),
            status=keys.status(message_id),
            due=keys.due(),
            outcome=keys.outcome(message_id),
            opening=self.opening(message_id, owner, started_at, deadline_at, first_at),
            subscription="" if subscription.is_empty else subscription.id,
            subscription_json=subscription.to_json(),
            subs_ttl_ms=self._subs_ttl_ms(),
        )
        session = self.parse(message_id, registered.fields)
        assert session is not None  # the script creates it
        raw = registered.cached
        cached = StatusCache.parse(raw) if raw else None
        return session, registered.added, cached, registered.ended

    def abandon(self, message_id: str, *, owner: str, subscription: str | None) -> None:
        """Undo a registration whose task was never published (see ``TrackTask``)."""
        self._abandon(
            session=self._keys.session(message_id),
            subs=self._keys.subs(message_id),
            owner=owner,
            subscription=subscription or "",
        )

    def outcome(self, message_id: str) -> dict[str, Any] | None:
        """The recorded final result, or None while tracking goes on."""
        raw = self._redis.get(self._keys.outcome(message_id))
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

    def forget(self, message_ids: Sequence[str]) -> None:
        """Delete everything stored about these messages (tests, re-tracking by hand)."""
        keys = []
        for m in message_ids:
            k = self._keys
            keys += [k.status(m), k.session(m), k.subs(m), k.claims(m), k.outcome(m)]
        if keys:
            self._redis.delete(*keys)
