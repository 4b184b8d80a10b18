"""Giving a fetched message back to its queue under a new delivery tag.

What upstream does: kombu's Redis ``QoS.restore_by_tag`` moves a message from the
``unacked`` hash back to its queue, atomically (WATCH), with the delivery tag it had. A
worker that was frozen (SIGSTOP, a VM without CPU) while the re-driver gave back what it
held still holds its own copy under that tag; when the copy given back is fetched again
it carries the same tag, so nothing tells the two apart.

What this does (:func:`restore_retagged`): the same transaction as ``restore_by_tag``,
but the message goes back with a fresh delivery tag (a uuid, as kombu's ``basic_publish``
draws one), and the old tag is recorded in a sorted set in the same transaction. The copy
held under the old tag is then known to be superseded (see
:mod:`smsbat_tracker.celery.redrive.fence`), and its acknowledgement deletes nothing
another worker relies on. It reads kombu's internals ``QoS._remove_from_indices`` and
``Channel._do_restore_message``; :func:`require_kombu` checks the version first.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Final

from smsbat_tracker.celery.compat import require

__all__ = ["BELOW", "LOWEST", "PACKAGE", "require_kombu", "restore_retagged"]

# The kombu versions whose Redis channel this was made for (and tested against).
PACKAGE: Final = "kombu"
LOWEST: Final = "5.3.4"
BELOW: Final = "5.8"


def require_kombu() -> None:
    """Raise :class:`~smsbat_tracker.errors.UnsupportedVersion` on a kombu this was not
    made for."""
    require(PACKAGE, LOWEST, BELOW)


def restore_retagged(
    channel: Any,
    tag: str,
    superseded_key: str,
    now: float,
    *,
    client: Any = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> str | None:
    """Give the message fetched under ``tag`` back to the head of its queue (the end
    consumed next) with a new delivery tag, and note ``tag`` in ``superseded_key``
    (scored ``now``), atomically. ``edit`` may change the message (its payload: headers,
    properties, body) before it goes back.

    Returns the new tag, or None when ``tag`` was no longer unacknowledged (acknowledged
    or given back meanwhile: nothing is written).
    """
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    qos = channel.qos
    new_tag = str(uuid.uuid4())
    restored: list[str] = []

    def transaction(pipe: Any) -> None:
        restored.clear()  # WATCH retries the function
        raw = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        if raw:
            payload, exchange, routing_key = loads(bytes_to_str(raw))
            payload["properties"]["delivery_tag"] = new_tag
            if edit is not None:
                edit(payload)
            pipe.zadd(superseded_key, {tag: now})
            # At the consuming end (kombu pops from the right): it was published before
            # everything queued now, and is the most overdue.
            channel._do_restore_message(payload, exchange, routing_key, pipe, False)
            restored.append(new_tag)

    with channel.conn_or_acquire(client) as conn:
        conn.transaction(transaction, qos.unacked_key)
    return restored[0] if restored else None
