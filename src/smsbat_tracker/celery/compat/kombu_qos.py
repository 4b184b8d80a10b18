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
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Final

import redis

from smsbat_tracker.celery.compat import require
from smsbat_tracker.log import get_logger

__all__ = ["BELOW", "LOWEST", "PACKAGE", "install", "make_deferred_acks"]

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
        _run_before_ack(self, delivery_tag)
        try:
            original_ack(self, delivery_tag)
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


def _run_before_ack(qos: Any, delivery_tag: Any) -> None:
    """The ``before_ack`` hook's pipeline, on the channel's client; its errors are logged
    (the acknowledgement then meets the same fault, and is deferred with the hook's part)."""
    if _BEFORE_ACK.get("hook") is None:
        return
    headers = _headers(qos, delivery_tag)
    if not headers:
        return
    try:
        # The client kombu's own acknowledgement uses (the channel's synchronous pool):
        # ``channel.client`` is the event loop's, with a BRPOP in flight.
        with qos.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            _add_before_ack(pipe, headers)
            pipe.execute()
    except (redis.RedisError, AttributeError) as exc:
        log.debug("redrive.before_ack_failed", tag=str(delivery_tag), error=str(exc)[:200])


def _ack_on_live_client(qos: Any, delivery_tag: Any, forget: Forget) -> None:
    """Acknowledge on the live client: the two deletions kombu's own ack makes."""
    client = _ACK_CLIENT.get("client")
    try:
        if client is None:
            raise redis.ConnectionError("no live client to acknowledge with")
        pipe = client.pipeline()
        _add_before_ack(pipe, _headers(qos, delivery_tag))
        pipe.zrem(qos.unacked_index_key, delivery_tag)
        pipe.hdel(qos.unacked_key, delivery_tag)
        pipe.execute()
    except redis.RedisError as exc:
        _defer_ack(qos, delivery_tag, forget, exc)
        return
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
    forget(qos, delivery_tag)


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
    pipe = client.pipeline()
    for tag, (index, unacked, headers) in deferred.items():
        _add_before_ack(pipe, headers)
        pipe.zrem(index, tag)
        pipe.hdel(unacked, tag)
    pipe.execute()
    with _DEFERRED_LOCK:
        for tag in deferred:
            _DEFERRED_ACKS.pop(tag, None)
    log.info("redrive.acks_made", tasks=len(deferred))
    return len(deferred)
