"""What the broker holds: the queue a task goes to, and whether a follow-up is still there.

Kombu's Redis transport keeps a queue's messages in lists (one per priority step) and the
fetched, unacknowledged ones in one hash. :meth:`Broker.in_broker` searches them on the
server, at most :data:`SCAN_BUDGET` entries a round trip: right after a crash, when the
backlog is largest, one script reading whole queues would block Redis for every client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import redis

from smsbat_tracker.store.keys import (
    KOMBU_PRIORITY_STEPS,
    kombu_queue_list,
    kombu_unacked_index_key,
    kombu_unacked_key,
)
from smsbat_tracker.store.session_scripts import InBroker, ScanPlace

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

__all__ = ["SCAN_BUDGET", "Broker", "routed_queue"]

# The most queue or hash entries one round trip of Broker.in_broker reads.
SCAN_BUDGET: Final = 1_000


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


class Broker:
    """The broker of ``app`` (kombu's Redis transport), as the tracker reads it."""

    def __init__(self, client: redis.Redis, app: Celery | None) -> None:
        self.app = app
        self._in_broker = InBroker(client)

    def queue_of(self, sig: Signature[Any]) -> str:
        """The queue ``sig`` goes to."""
        options = sig.options or {}
        if self.app is None and not isinstance(options.get("queue"), str):
            return "celery"
        return routed_queue(self.app, str(sig.task), options)[0]

    def unacked_key(self) -> str:
        """Kombu's hash of fetched, unacknowledged messages on this app's broker."""
        return kombu_unacked_key(self.app.conf.broker_transport_options if self.app else None)

    def unacked_index_key(self) -> str:
        """Kombu's sorted set of when each unacknowledged message was fetched."""
        return kombu_unacked_index_key(self.app.conf.broker_transport_options if self.app else None)

    def in_broker(self, task_ids: Sequence[str], sigs: Sequence[Signature[Any]]) -> set[str]:
        """Which of ``task_ids`` the broker holds: in their queues, or unacknowledged."""
        return set(self.locate(task_ids, sigs))

    def locate(
        self, task_ids: Sequence[str], sigs: Sequence[Signature[Any]]
    ) -> dict[str, str | None]:
        """Where the broker holds each of ``task_ids`` it holds: None for one in its queue,
        its delivery tag for one a worker fetched and has not acknowledged.

        Read in slices of :data:`SCAN_BUDGET` entries, one round trip each, until every id
        is found or all is read. Each slice is atomic; a message that moves between the
        places meanwhile is looked for where it goes (see ``session_in_broker.lua``).
        """
        queues = [
            kombu_queue_list(self.queue_of(sig), p) for sig in sigs for p in KOMBU_PRIORITY_STEPS
        ]
        wanted = list(dict.fromkeys(task_ids))
        found: set[str] = set()
        fetched: dict[str, str] = {}
        at, cursor = int(ScanPlace.FIRST), "0"
        while wanted:
            piece = self._in_broker(
                unacked=self.unacked_key(),
                queues=list(dict.fromkeys(queues)),
                budget=SCAN_BUDGET,
                at=at,
                cursor=cursor,
                task_ids=wanted,
            )
            found |= piece.found
            fetched.update(piece.unacked)
            if piece.done:
                break
            wanted = [i for i in wanted if i not in found]
            at, cursor = piece.at, piece.cursor
        return {task_id: fetched.get(task_id) for task_id in found}
