"""The worker bootstep that runs the re-driver, so that there is nothing more to run.

On the workers of an app that called ``init_app``, :class:`RedriveStep` installs the kombu
QoS patch (:mod:`smsbat_tracker.celery.compat.kombu_qos`) and the fence of woken workers
(:mod:`smsbat_tracker.celery.compat.celery_request`), notes each task the worker
receives, and runs :class:`~.redriver.Redriver` on a thread every second until the
worker stops; then it keeps the running tasks' entries alive until they are done, and
retires.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import redis
from celery import bootsteps, signals

from smsbat_tracker.celery.compat import (
    celery_pool,
    celery_reconnect,
    celery_request,
    kombu_qos,
)
from smsbat_tracker.celery.names import DUE_INDEXED
from smsbat_tracker.celery.redrive.bounds import HEARTBEAT, NOTE_EVERY
from smsbat_tracker.celery.redrive.follow_ups import note_receipt_on_ack
from smsbat_tracker.celery.redrive.held import (
    connection_name,
    held_requests,
    running_requests,
)
from smsbat_tracker.celery.redrive.redriver import Redriver
from smsbat_tracker.celery.tracker import find_tracker
from smsbat_tracker.config import Settings
from smsbat_tracker.log import get_logger
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.store.keys import Keys

__all__ = ["RedriveStep"]

log = get_logger(__name__)


def _detail(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "detail": str(exc)[:200]}


class RedriveStep(bootsteps.StartStopStep):
    """Worker bootstep: runs this worker's :class:`Redriver` on a thread every second."""

    label = "smsbat re-driver"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._redriver: Redriver | None = None

    def start(self, parent: Any) -> None:
        tracker = find_tracker(parent.app)
        if tracker is None:  # not an app that runs the tracker: nothing to do
            return
        holder = uuid.uuid4().hex
        self._client = self._make_client(tracker.settings, connection_name(holder))
        kombu_qos.install(
            self._client,
            before_ack=note_receipt_on_ack(Keys(tracker.settings.key_prefix)),
        )
        redriver = self._redriver = Redriver(tracker, self._client, holder)
        celery_request.install(redriver.fence.superseded)
        celery_pool.install()
        celery_reconnect.install()
        signals.task_received.connect(self._received, weak=False)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop,
            args=(redriver, self._client),
            name="smsbat-redriver",
            daemon=True,
        )
        self._thread.start()
        threading.Thread(
            target=self._flush, args=(redriver,), name="smsbat-receipts", daemon=True
        ).start()

    @staticmethod
    def _make_client(settings: Settings, name: str) -> redis.Redis:
        """The re-driver's client, its connections named ``name``: closed by the kernel
        when this process dies, so that the others find it gone (:mod:`.dead`). Unnamed
        when the server refuses ``CLIENT SETNAME`` (an ACL): the others then wait
        ``SMSBAT_REDRIVE_AFTER``, as for a frozen worker."""
        options: dict[str, Any] = {
            "decode_responses": True,
            # Short: the receipt hook runs on the consumer's thread.
            "socket_timeout": 2,
            "socket_connect_timeout": 1,
            "health_check_interval": 30,
        }
        client = redis_client(settings, client_name=name, **options)
        try:
            client.ping()
        except redis.ResponseError as exc:
            log.warning("redrive.unnamed", **_detail(exc))
            client.close()
            return redis_client(settings, **options)
        except redis.RedisError:  # away at start: the beats retry
            pass
        return client

    def _received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        redriver = self._redriver
        if redriver is None or request is None:
            return
        # A tracker run is noted with the next flush, many in one command (a check then
        # costs its two round trips only). Callbacks and the rest are noted at once.
        at_once = getattr(request, "name", None) not in DUE_INDEXED
        try:
            redriver.held.note_received(request, at_once=at_once)
        except redis.RedisError as exc:  # away: the heartbeat notes it later
            log.debug("redrive.receipt_not_noted", **_detail(exc))

    def _flush(self, redriver: Redriver) -> None:
        """Note the tracker runs received lately, every :data:`.NOTE_EVERY`."""
        while not self._stop.wait(NOTE_EVERY):
            try:
                redriver.held.flush_received()
            except redis.RedisError as exc:  # away: the heartbeat notes them later
                log.debug("redrive.receipts_not_noted", **_detail(exc))

    def _loop(self, redriver: Redriver, client: redis.Redis) -> None:
        failing = False
        # The first beat at once: a worker started after a crash of every worker gives
        # back what the dead ones held without waiting a beat (they are gone already).
        wait = 0.0
        while not self._stop.wait(wait):
            wait = HEARTBEAT
            try:
                redriver.run_once()
                redriver.tracker.last_beat = time.monotonic()  # what /healthz reads
                failing = False
            except Exception as exc:  # Redis away: keep beating; the next one may work
                # Logged once per outage; the beats after it fail the same way.
                (log.debug if failing else log.warning)("redrive.failed", **_detail(exc))
                failing = True
        # Stopping. The steps stop before the pool has drained (a warm shutdown waits for
        # the running tasks): keep their entries alive until they are done, then retire.
        # Dying meanwhile is a dead worker's case: the others give back what it held.
        while running := running_requests():
            due, scheduled = held_requests()
            try:
                redriver.held.note_held(due + scheduled, time.time())
                redriver.refresher.refresh(running)
            except redis.RedisError as exc:
                log.debug("redrive.stopping_beat_failed", **_detail(exc))
            time.sleep(HEARTBEAT / 5)
        try:
            redriver.held.retire(time.time())
        except redis.RedisError as exc:  # left to the others' sweep, as a dead worker's
            log.warning("redrive.retire_failed", **_detail(exc))
        client.close()

    def stop(self, parent: Any) -> None:
        signals.task_received.disconnect(self._received)
        celery_request.uninstall()
        self._stop.set()
        self._thread = None  # it retires on its own once the running tasks are done
        self._redriver = None
        self._client = None

    # A cold shutdown terminates the steps instead of stopping them.
    terminate = shutdown = stop
