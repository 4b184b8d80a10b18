"""kombu's Redis QoS kept working when Redis goes away under a worker: acks are not lost.

What upstream does: on a lost connection the consumer closes it, and closing the channel
gives its unacknowledged tasks back: kombu's Redis ``QoS.restore_unacked`` then builds a
client from a connection already torn down and raises ``AttributeError``, which Celery
does not ignore ("Unrecoverable error": the worker exits). A task that was running
meanwhile finishes after the reconnect and is acknowledged (``QoS.ack``/``reject``) on the
old channel: the same ``AttributeError``. One that finishes while Redis is still away (a
Sentinel failover takes seconds) raises a connection error, and Celery logs "Couldn't ack"
and leaves the task unacked, to run again.

What the patch does (:func:`install`, by the re-driver's bootstep): ``restore_unacked``
logs and returns (with Redis away nothing can be restored anyway: the tasks stay in
kombu's ``unacked`` hash, and the re-driver gives back those the worker no longer holds
once Redis is back). An acknowledgement on a torn-down channel is made on the re-driver's
live client instead (the same two deletions kombu makes); one Redis is away for is
deferred, and made by :func:`make_deferred_acks` at the re-driver's first beat that
reaches Redis, before it gives anything back. Every error the patch absorbs is logged.

An acknowledgement can also run a hook first (``before_ack``): it adds commands to a
pipeline sent just before the acknowledgement, on the same Redis (the channel's own
client; the live client, or the deferred acknowledgements' pipeline, when the ack is
made there): after a Sentinel failover, a Redis that has the acknowledgement has the
hook's writes too.

A master that dies may not have passed its last writes on to the replica a Sentinel
promotes (replication is asynchronous): an acknowledgement made just before, with its
hook's writes, can be lost, and the task would run again. Acknowledgements are kept in
memory for a moment (:func:`forget_acks_before`, at each beat), and the first beat after
an outage makes those made since just before the last beat that reached Redis again
(:func:`replay_acks_since`): the same deletions and hook, harmless where they held.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import redis

from smsbat_tracker.celery.compat import require
from smsbat_tracker.log import get_logger

__all__ = [
    "BELOW",
    "LOWEST",
    "PACKAGE",
    "RECENT_MAX",
    "forget_acks_before",
    "install",
    "left_for_requeue",
    "make_acks",
    "make_deferred_acks",
    "replay_acks_since",
]

log = get_logger(__name__)

# The kombu versions whose Redis QoS this patch was made for (and tested against).
PACKAGE: Final = "kombu"
LOWEST: Final = "5.3.4"
BELOW: Final = "5.8"

# Set on the patched restore_unacked: installed already.
_MARK: Final = "_smsbat_guarded"

# The client a torn-down channel's acknowledgements are made with (see install).
_ACK_CLIENT: dict[str, redis.Redis] = {}

# Acknowledgements Redis was away for: delivery tag -> (kombu's unacked index, unacked
# hash, the message's headers). Made at the re-driver's next beat that reaches Redis;
# never given back meanwhile.
_DEFERRED_ACKS: dict[str, tuple[str, str, dict[str, Any]]] = {}
_DEFERRED_LOCK = threading.Lock()

# Acknowledgements made lately (monotonic time, tag, unacked index, unacked hash, headers),
# oldest first: made again after an outage, in case the master that had them died before
# its replica did (see the module's docstring).
# Bounded: a beat forgets all but the last second or two; a worker whose beats stopped keeps
# the newest (the oldest are the least at risk).
RECENT_MAX: Final = 20_000
_RECENT_ACKS: deque[tuple[float, str, str, str, dict[str, Any]]] = deque(maxlen=RECENT_MAX)
_RECENT_LOCK = threading.Lock()

# Rejections to requeue that Redis was away for (their tasks are to be given back), newest
# last; a handful at most, between two outages.
_LEFT_FOR_REQUEUE: deque[str] = deque(maxlen=RECENT_MAX)

# kombu's virtual QoS.ack: forgets a delivery in this process (no Redis call).
Forget = Callable[[Any, Any], None]

# Adds commands to the pipeline sent before an acknowledgement, given the task's headers.
BeforeAck = Callable[[Any, dict[str, Any]], None]
_BEFORE_ACK: dict[str, BeforeAck] = {}


def install(client: redis.Redis | None = None, before_ack: BeforeAck | None = None) -> None:
    """Patch kombu's Redis ``QoS`` (once; a later call only sets ``client`` and the hook).

    ``client`` is the live client acknowledgements on a torn-down channel are made with;
    ``before_ack(pipeline, headers)`` adds to the pipeline sent before each one.
    Raises :class:`~smsbat_tracker.errors.UnsupportedVersion` (patching nothing) on a
    kombu outside ``LOWEST``..``BELOW``.
    """
    require(PACKAGE, LOWEST, BELOW)
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    if client is not None:
        _ACK_CLIENT["client"] = client
    if before_ack is not None:
        _BEFORE_ACK["hook"] = before_ack
    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, _MARK, False):
        return
    original_restore, original_ack, original_reject = qos.restore_unacked, qos.ack, qos.reject
    forget: Forget = virtual.QoS.ack

    # Each wrapper names kombu's method it wraps (``__wrapped__``, for inspect.unwrap).
    @functools.wraps(original_restore)
    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original_restore(self, client)
        except AttributeError as exc:
            log.warning(
                "redrive.restore_on_close_failed", held=len(self._delivered), error=str(exc)[:200]
            )

    @functools.wraps(original_ack)
    def ack(self: Any, delivery_tag: Any) -> None:
        headers = _headers(self, delivery_tag)
        try:
            _ack_with_hook(self, delivery_tag, headers, original_ack, forget)
        except AttributeError as exc:
            log.warning(
                "redrive.ack_on_closed_channel", tag=str(delivery_tag), error=str(exc)[:200]
            )
            _ack_on_live_client(self, delivery_tag, forget)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            _defer_ack(self, delivery_tag, forget, exc)

    @functools.wraps(original_reject)
    def reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            original_reject(self, delivery_tag, requeue)
        except AttributeError as exc:
            log.warning(
                "redrive.reject_on_closed_channel",
                tag=str(delivery_tag),
                requeue=requeue,
                error=str(exc)[:200],
            )
            if requeue:
                _requeue_on_live_client(self, delivery_tag, forget)
                return
            _ack_on_live_client(self, delivery_tag, forget)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if requeue:
                _leave_unacked(self, delivery_tag, forget, exc)
            else:
                _defer_ack(self, delivery_tag, forget, exc)

    setattr(restore_unacked, _MARK, True)
    qos.restore_unacked = restore_unacked  # type: ignore[method-assign]
    qos.ack = ack  # type: ignore[method-assign]
    qos.reject = reject  # type: ignore[method-assign]


def installed() -> bool:
    """Whether kombu's Redis QoS carries this patch."""
    from kombu.transport import redis as kombu_redis

    return bool(getattr(kombu_redis.QoS.restore_unacked, _MARK, False))


def _headers(qos: Any, delivery_tag: Any) -> dict[str, Any]:
    """The headers of the message held under ``delivery_tag`` (empty: none held)."""
    message = qos._delivered.get(delivery_tag)
    return dict(getattr(message, "headers", None) or {})


def _add_before_ack(pipe: Any, headers: dict[str, Any]) -> None:
    hook = _BEFORE_ACK.get("hook")
    if hook is not None and headers:
        hook(pipe, headers)


def _ack_with_hook(
    qos: Any, delivery_tag: Any, headers: dict[str, Any], original_ack: Any, forget: Forget
) -> None:
    """kombu's acknowledgement, with the hook's commands in the same transaction when there
    is a hook (kombu's own pipeline, on the channel's synchronous pool: ``channel.client``
    is the event loop's, with a BRPOP in flight)."""
    if _BEFORE_ACK.get("hook") is None or not headers:
        original_ack(qos, delivery_tag)
    else:
        with qos.pipe_or_acquire() as pipe:
            _add_before_ack(pipe, headers)
            qos._remove_from_indices(delivery_tag, pipe).execute()
        forget(qos, delivery_tag)
    _note_recent(str(delivery_tag), qos.unacked_index_key, qos.unacked_key, headers)


def _note_recent(tag: str, index: str, unacked: str, headers: dict[str, Any]) -> None:
    with _RECENT_LOCK:
        _RECENT_ACKS.append((time.monotonic(), tag, index, unacked, headers))


def forget_acks_before(moment: float) -> None:
    """Forget the acknowledgements made before ``moment`` (monotonic): a beat that reached
    Redis since shows the master had them long enough to pass them on."""
    with _RECENT_LOCK:
        while _RECENT_ACKS and _RECENT_ACKS[0][0] < moment:
            _RECENT_ACKS.popleft()


def make_acks(
    client: redis.Redis, acks: list[tuple[str, str, str, dict[str, Any]]], *, note: bool = True
) -> None:
    """Acknowledge on ``client``: for each (tag, unacked index, unacked hash, headers), the
    hook's commands and the two deletions kombu's own ack makes, in one pipeline; noted
    among the recent acknowledgements unless ``note`` is false. Raises
    :class:`redis.RedisError` while Redis is away."""
    if not acks:
        return
    pipe = client.pipeline()  # one MULTI: a Redis with the acknowledgement has the hook's writes
    for tag, index, unacked, headers in acks:
        _add_before_ack(pipe, headers)
        pipe.zrem(index, tag)
        pipe.hdel(unacked, tag)
    pipe.execute()
    if note:
        for tag, index, unacked, headers in acks:
            _note_recent(tag, index, unacked, headers)


def replay_acks_since(client: redis.Redis, moment: float) -> int:
    """Make again the acknowledgements made since ``moment`` (monotonic), with their hook,
    on ``client`` (the master now); returns how many. Raises :class:`redis.RedisError`
    while Redis is away."""
    with _RECENT_LOCK:
        recent = [a[1:] for a in _RECENT_ACKS if a[0] >= moment]
    if not recent:
        return 0
    make_acks(client, recent, note=False)
    log.info("redrive.acks_replayed", tasks=len(recent))
    return len(recent)


def _ack_on_live_client(qos: Any, delivery_tag: Any, forget: Forget) -> None:
    """Acknowledge on the live client: the two deletions kombu's own ack makes."""
    client = _ACK_CLIENT.get("client")
    headers = _headers(qos, delivery_tag)
    try:
        if client is None:
            raise redis.ConnectionError("no live client to acknowledge with")
        pipe = client.pipeline()
        _add_before_ack(pipe, headers)
        pipe.zrem(qos.unacked_index_key, delivery_tag)
        pipe.hdel(qos.unacked_key, delivery_tag)
        pipe.execute()
    except redis.RedisError as exc:
        _defer_ack(qos, delivery_tag, forget, exc)
        return
    _note_recent(str(delivery_tag), qos.unacked_index_key, qos.unacked_key, headers)
    forget(qos, delivery_tag)


def _requeue_on_live_client(qos: Any, delivery_tag: Any, forget: Forget) -> None:
    """Give a rejected task back on the live client, with kombu's own ``restore_by_tag``."""
    client = _ACK_CLIENT.get("client")
    try:
        if client is None:
            raise redis.ConnectionError("no live client to requeue with")
        qos.restore_by_tag(delivery_tag, client=client, leftmost=True)
    except redis.RedisError as exc:
        _leave_unacked(qos, delivery_tag, forget, exc)
        return
    forget(qos, delivery_tag)


def _leave_unacked(qos: Any, delivery_tag: Any, forget: Forget, exc: BaseException) -> None:
    """A requeue Redis is away for: left unacked in Redis, for the re-driver to give back
    once this worker no longer holds it; forgotten here (not given back at close)."""
    log.warning("redrive.requeue_left_unacked", tag=str(delivery_tag), error=str(exc)[:200])
    with _RECENT_LOCK:
        _LEFT_FOR_REQUEUE.append(str(delivery_tag))
    forget(qos, delivery_tag)


def left_for_requeue(tag: str) -> bool:
    """Whether this worker rejected ``tag`` to requeue it while Redis was away (to be
    given back, although the worker's pool may have run it)."""
    with _RECENT_LOCK:
        return tag in _LEFT_FOR_REQUEUE


def _defer_ack(qos: Any, delivery_tag: Any, forget: Forget, exc: BaseException) -> None:
    headers = _headers(qos, delivery_tag)
    with _DEFERRED_LOCK:
        _DEFERRED_ACKS[str(delivery_tag)] = (qos.unacked_index_key, qos.unacked_key, headers)
    log.warning("redrive.ack_deferred", tag=str(delivery_tag), error=str(exc)[:200])
    forget(qos, delivery_tag)  # nor given back when the channel closes


def make_deferred_acks(client: redis.Redis) -> int:
    """Make the acknowledgements Redis was away for (see :func:`install`); returns how
    many. Raises :class:`redis.RedisError` while Redis is still away."""
    with _DEFERRED_LOCK:
        deferred = dict(_DEFERRED_ACKS)
    if not deferred:
        return 0
    make_acks(client, [(tag, *entry) for tag, entry in deferred.items()])
    with _DEFERRED_LOCK:
        for tag in deferred:
            _DEFERRED_ACKS.pop(tag, None)
    log.info("redrive.acks_made", tasks=len(deferred))
    return len(deferred)
