"""The consumer reconnects to the broker within a second of its return
(celery/compat/celery_reconnect.py), and what of Celery and kombu the patch relies on."""

from __future__ import annotations

import inspect
from typing import Any

from celery.worker.consumer.consumer import Consumer
from kombu import Connection

from smsbat_tracker.celery.compat import celery_reconnect


def test_upstream_reconnects_with_kombus_default_backoff() -> None:
    """What the patch makes up for: the consumer's ensure_connected calls its connection's
    ensure_connection with no intervals, and kombu's defaults sleep 2, 4, 6 ... s between
    tries. When this fails, upstream changed: look again at whether the patch is still
    needed, and still right."""
    source = inspect.getsource(inspect.unwrap(Consumer.ensure_connected))
    assert "conn.ensure_connection(" in source
    assert "interval_" not in source
    defaults = inspect.signature(Connection._ensure_connection).parameters
    assert (defaults["interval_start"].default, defaults["interval_step"].default) == (2, 2)
    assert set(celery_reconnect.INTERVALS) <= set(defaults)


class _Conn(Connection):  # type: ignore[misc]
    """A connection that records how it was asked to ensure itself."""

    asked: dict[str, Any]

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.asked = {"args": args, **kwargs}
        return self


def test_the_consumers_reconnection_tries_again_within_a_second() -> None:
    """Patched, ensure_connected asks kombu for sleeps of 0.25 s growing to 1 s, with
    Celery's own error handler and retry count; the connection is left as it was."""
    conn = _Conn("memory://")

    def upstream(self: Any, conn: Any) -> Any:  # what Consumer.ensure_connected does
        return conn.ensure_connection(print, 100, callback=None)

    assert celery_reconnect.quick_retries(upstream)(object(), conn) is conn
    assert conn.asked == {"args": (print, 100), "callback": None, **celery_reconnect.INTERVALS}
    assert "ensure_connection" not in vars(conn)
    conn.release()


def test_install_patches_once() -> None:
    """Installed twice, ensure_connected is wrapped once."""
    celery_reconnect.install()
    patched = Consumer.ensure_connected
    celery_reconnect.install()
    assert Consumer.ensure_connected is patched
    assert celery_reconnect.installed()
