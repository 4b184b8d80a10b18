"""Redis key names, all in one place, under a configurable prefix.

Every key of one message shares the hash tag ``{<message id>}``. The due index and the
re-drive lock are global: kombu's Redis transport does not run on a Redis Cluster, so
neither does the tracker.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["KOMBU_PRIORITY_STEPS", "Keys", "kombu_queue_list", "kombu_unacked_key"]

# Kombu's Redis transport: a queue's messages of priority step ``p`` wait in the list
# ``<queue>\x06\x16<p>`` (``<queue>`` itself for 0), and fetched, unacknowledged ones in
# one hash.
KOMBU_PRIORITY_STEPS: Final = (0, 3, 6, 9)
_KOMBU_PRIORITY_SEP: Final = "\x06\x16"


def kombu_queue_list(queue: str, priority: int = 0) -> str:
    """The Redis list kombu keeps ``queue``'s messages of ``priority`` in."""
    return f"{queue}{_KOMBU_PRIORITY_SEP}{priority}" if priority else queue


def kombu_unacked_key(transport_options: Mapping[str, Any] | None) -> str:
    """The hash kombu keeps fetched, unacknowledged messages in."""
    return str((transport_options or {}).get("unacked_key", "unacked"))


def kombu_unacked_index_key(transport_options: Mapping[str, Any] | None) -> str:
    """The sorted set of when each unacknowledged message was fetched (delivery tag -> time)."""
    return str((transport_options or {}).get("unacked_index_key", "unacked_index"))


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds key names under ``prefix`` (``SMSBAT_KEY_PREFIX``)."""

    prefix: str = "smsbat"

    def status(self, message_id: str) -> str:
        """Cached status: last body, observed_at, source and recent changes (the history)."""
        return f"{self.prefix}:status:{{{message_id}}}"

    def session(self, message_id: str) -> str:
        """Tracking session hash: owner task id and the run it expects next (the fencing
        token), started_at, deadline_at, checks, polls."""
        return f"{self.prefix}:session:{{{message_id}}}"

    def subs(self, message_id: str) -> str:
        """Subscriptions hash: subscription id -> callbacks JSON."""
        return f"{self.prefix}:subs:{{{message_id}}}"

    def claims(self, message_id: str) -> str:
        """Dispatch claims hash: subscription id -> ``pending:<claimer>:<ms>`` or ``sent``."""
        return f"{self.prefix}:claims:{{{message_id}}}"

    def outcome(self, message_id: str) -> str:
        """The final result dict of the message's tracking, written once (SET NX)."""
        return f"{self.prefix}:outcome:{{{message_id}}}"

    def poll_gate(self, message_id: str) -> str:
        """Held for the minimum interval after each status request (SET NX PX)."""
        return f"{self.prefix}:gate:{{{message_id}}}"

    def campaign(self, campaign_id: str) -> str:
        """Campaign hash: started_at, deadline_at, total, done, per-outcome counts, callbacks."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}"

    def campaign_due(self, campaign_id: str) -> str:
        """Sorted set of the campaign's unfinished messages, scored by next check time."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:due"

    def campaign_checks(self, campaign_id: str) -> str:
        """Hash: message id -> checks made so far (the backoff grows with it)."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:checks"

    def campaign_outcomes(self, campaign_id: str) -> str:
        """Hash: message id -> compact outcome record, written once (HSETNX)."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:outcomes"

    def campaign_report(self, campaign_id: str) -> str:
        """The final report JSON, written once (SET NX)."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:report"

    def campaign_claimed(self, campaign_id: str, slot: int) -> str:
        """Sorted set: the messages the tick chain ``slot`` claimed for the batch it is
        checking, each scored by when it fell due (where it goes back if the tick dies)."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:claimed:{slot}"

    def campaign_ticket(self, campaign_id: str, slot: int) -> str:
        """The rate-limit tokens the tick chain ``slot`` booked ahead for its next batch:
        ``"<us the last is due>:<count>"``, expiring soon after they come due."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:ticket:{slot}"

    def campaign_unsent(self, campaign_id: str) -> str:
        """Hash: message id -> ms at which its recorded outcome's callback was claimed."""
        return f"{self.prefix}:campaign:{{{campaign_id}}}:unsent"

    def due(self) -> str:
        """The due index: every in-flight tracking and tick chain, scored by next run time.

        Members are ``m:<message id>`` (a ``track_message`` session) and
        ``c:<campaign id>:<slot>`` (a campaign's tick chain); see
        :mod:`smsbat_tracker.celery.redrive`.
        """
        return f"{self.prefix}:due"

    @staticmethod
    def due_message(message_id: str) -> str:
        """The due index member of a message's ``track_message`` session."""
        return f"m:{message_id}"

    @staticmethod
    def due_tick(campaign_id: str, slot: int) -> str:
        """The due index member of a campaign's tick chain ``slot``."""
        return f"c:{campaign_id}:{slot}"

    def holders(self) -> str:
        """Sorted set: each live worker's re-driver id -> its last heartbeat (epoch)."""
        return f"{self.prefix}:holders"

    def beats(self) -> str:
        """Sorted set: each live worker's re-driver id -> its last heartbeat on the Redis
        server's clock (only workers whose connections carry their name: see
        smsbat_tracker.celery.redrive.dead)."""
        return f"{self.prefix}:holders:served"

    def held(self, holder: str) -> str:
        """Set: the broker delivery tags a worker held at its last heartbeat."""
        return f"{self.prefix}:held:{holder}"

    def held_handed(self, holder: str) -> str:
        """Set: the delivery tags of the follow-ups (and other tasks the tracker cannot
        fence by a token) that a worker had handed to its pool: a frozen worker runs them
        when it wakes up, whatever was given back meanwhile."""
        return f"{self.prefix}:held:{holder}:handed"

    def superseded(self) -> str:
        """Sorted set: delivery tags given back to the queue under a new tag -> when.

        The copy a frozen worker still holds under the old tag was superseded: it must not
        run when that worker wakes up (see smsbat_tracker.celery.redrive.fence).
        """
        return f"{self.prefix}:superseded"

    def ran(self, task_id: str) -> str:
        """String: a follow-up task that ran and was acknowledged (kept briefly: a copy of
        it a failover or a give-back brings back is then skipped)."""
        return f"{self.prefix}:ran:{task_id}"

    def dispatch_id(self, *parts: str) -> str:
        """The task id of one follow-up task (a callback, a link, a chain step, a report).

        Derived from what it follows up, so that sending it again after a crash (the
        sender died between sending it and marking it sent) sends the same task: a
        callback can use ``self.request.id`` as its idempotency key.
        """
        return str(uuid.uuid5(uuid.NAMESPACE_URL, ":".join((self.prefix, "dispatch", *parts))))

    def redrive_lock(self) -> str:
        """Held by the one worker sweeping the due index (SET NX PX)."""
        return f"{self.prefix}:redrive:lock"

    def rate_limit(self) -> str:
        """The global API token bucket shared by every worker."""
        return f"{self.prefix}:ratelimit"

    def rate_waiters(self) -> str:
        """Zset: callers the rate limit turned away, scored by when their check fell due."""
        return f"{self.prefix}:ratelimit:waiters"

    def rate_waiters_back(self) -> str:
        """Zset: the same callers, scored by when they are expected to ask again."""
        return f"{self.prefix}:ratelimit:waiters:back"

    def unreceived(self) -> str:
        """Zset: follow-up tasks sent and not yet received by a worker, scored by send time."""
        return f"{self.prefix}:unreceived"

    def unreceived_sends(self) -> str:
        """Hash: how to send each of ``unreceived`` again (signature, argument, options)."""
        return f"{self.prefix}:unreceived:sends"

    def worker_queues(self) -> str:
        """Hash: queue name -> when a tracker worker consuming it last beat."""
        return f"{self.prefix}:queues"

    def rate_pause(self) -> str:
        """Set while the API asked everyone to back off (HTTP 429 Retry-After)."""
        return f"{self.prefix}:ratelimit:pause"
