"""Sending a settled tracking's callbacks, once: publish each follow-up, then mark it sent.

Only the caller that claimed a subscription (see :mod:`smsbat_tracker.engine.settle`)
sends its callback, links and chain step, each under a task id derived from what it
follows up (:meth:`~smsbat_tracker.store.keys.Keys.dispatch_id`), so that a claimer that
died between sending and marking sent sends the same task again, unless the broker still
holds it. A follow-up to a queue tracker workers consume is noted until one receives it
(the re-driver sends it again if kombu lost it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import redis

from smsbat_tracker.config import Settings
from smsbat_tracker.engine.broker import Broker
from smsbat_tracker.engine.session import SettleResult
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.store.session_scripts import MarkSent, ReleaseClaims

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

__all__ = ["FOLLOW_UP_HEADER", "QUEUES_CACHE", "Dispatcher", "follow_up_options"]

# How long a process trusts its copy of which queues tracker workers consume.
QUEUES_CACHE: Final = 5.0

log = get_logger(__name__)

# The header of a follow-up whose receipt is watched: its acknowledgement notes the
# receipt too, on the broker's own connection (smsbat_tracker.celery.redrive.follow_ups).
FOLLOW_UP_HEADER: Final = "smsbat_follow_up"


def follow_up_options(
    options: Mapping[str, Any] | None, sig: Signature[Any] | None = None
) -> dict[str, Any]:
    """``options`` with the follow-up header added to its message headers, keeping the
    headers ``sig`` carries (Celery's ``apply_async`` would replace them with ours)."""
    options = dict(options or {})
    own = dict((sig.options if sig is not None else {}).get("headers") or {})
    given = dict(options.get("headers") or {})
    options["headers"] = {**own, **given, FOLLOW_UP_HEADER: "1"}
    return options


class Dispatcher:
    """Sends claimed callbacks through ``app``, each once."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        keys: Keys,
        broker: Broker,
        app: Celery | None,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._keys = keys
        self._broker = broker
        self._app = app
        self.mark_sent = MarkSent(client)
        self._release = ReleaseClaims(client)
        # When the queues tracker workers consume were last read, and what they were.
        self.queues_seen: tuple[float, set[str]] = (0.0, set())

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
        keys = self._keys
        # One id per follow-up of this tracking (a later tracking of the same id differs).
        session_key = f"{message_id}@{result.get('started_at')}"
        done = 0
        try:
            for sub_id, sub in settled.claimed:
                sends: list[tuple[Signature[Any], str, dict[str, Any]]] = []
                callback = sub.callback_for(outcome)
                if callback:
                    sig = signature(callback, app=self._app)
                    sends.append((sig, keys.dispatch_id(session_key, sub_id), {}))
                    log.info(
                        "track.callback",
                        message_id=message_id,
                        outcome=outcome,
                        callback=sig.task,
                        subscription=sub_id,
                    )
                for n, link in enumerate(sub.links or ()):
                    task_id = keys.dispatch_id(session_key, sub_id, f"link{n}")
                    sends.append((signature(link, app=self._app), task_id, {}))
                if sub.chain:
                    # As Celery itself continues a chain: the last entry is the next step.
                    task_id = keys.dispatch_id(session_key, sub_id, "chain")
                    chain = {"chain": sub.chain[:-1] or None}
                    sends.append((signature(sub.chain[-1], app=self._app), task_id, chain))
                self.send_once(sends, result, maybe_sent=sub_id in settled.retaken)
                self.mark_sent(
                    claims=keys.claims(message_id),
                    subs=keys.subs(message_id),
                    due=keys.due(),
                    outcome=keys.outcome(message_id),
                    session=keys.session(message_id),
                    status=keys.status(message_id),
                    due_member=Keys.due_message(message_id),
                    subscription=sub_id,
                )
                done += 1
        except BaseException:
            left = [sub_id for sub_id, _ in settled.claimed[done:]]
            try:
                self._release(
                    claims=keys.claims(message_id),
                    mark_prefix=f"pending:{claimer}:",
                    subscriptions=left,
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
            present = self._broker.in_broker(
                [task_id for _, task_id, _ in sends], [s for s, _, _ in sends]
            )
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
            (sig, task_id, follow_up_options(options, sig))
            for sig, task_id, options in todo
            if watched and self._broker.queue_of(sig) in watched
        ]
        marked = {task_id: options for _, task_id, options in noted}
        todo = [(sig, task_id, marked.get(task_id, options)) for sig, task_id, options in todo]
        if noted:
            pipe = self._redis.pipeline(transaction=False)
            for sig, task_id, options in noted:
                send = {"sig": dict(sig), "result": dict(result), "options": options, "n": 0}
                pipe.zadd(self._keys.unreceived(), {task_id: now})
                pipe.hset(self._keys.unreceived_sends(), task_id, json.dumps(send, default=str))
            pipe.execute()
        done = 0
        try:
            for sig, task_id, options in todo:
                sig.apply_async((dict(result),), task_id=task_id, **options)
                done += 1
        except BaseException:
            unsent = [task_id for _, task_id, _ in todo[done:]]
            if noted and unsent:
                try:
                    self._redis.zrem(self._keys.unreceived(), *unsent)
                    self._redis.hdel(self._keys.unreceived_sends(), *unsent)
                except redis.RedisError as exc:  # the sweep finds them unsent and sends them
                    log.warning("dispatch.unnote_failed", tasks=len(unsent), error=str(exc))
            raise

    def _watched_queues(self, now: float) -> set[str]:
        """The queues tracker workers consume (they confirm receipts), cached briefly."""
        at, queues = self.queues_seen
        if now - at > QUEUES_CACHE:
            live = now - QUEUES_CACHE - 2 * self._settings.redrive_after
            raw = self._redis.hgetall(self._keys.worker_queues())
            queues = {str(q) for q, seen in raw.items() if float(seen) > live}
            self.queues_seen = (now, queues)
        return queues
