"""A worker that wakes up from a freeze never runs what was handed to another worker.

The give-back under a new delivery tag (celery/compat/kombu_restore.py), the worker's fence
(celery/redrive/fence.py) and the patch of Celery's ``Request.revoked``
(celery/compat/celery_request.py): what each does, against a real Redis, a real kombu
channel and real workers, and what of Celery and kombu they rely on.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.worker import request as celery_request_module
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from structlog.testing import capture_logs

from smsbat_tracker.celery.compat import celery_request, kombu_restore
from smsbat_tracker.celery.names import TRACK_TASK
from smsbat_tracker.celery.redrive import Redriver
from smsbat_tracker.celery.redrive.bounds import GONE_AFTER
from smsbat_tracker.celery.redrive.fence import LOOKUP_PAUSE, MARGIN, Fence
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.dispatch import FOLLOW_UP_HEADER
from smsbat_tracker.errors import UnsupportedVersion
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.workers import worker_process
from tests.conftest import recorded, wait_for


def _request(
    tag: str, name: str = "smsbat_tracker.recipes.record_outcome", headers: Any = None
) -> Any:
    message = SimpleNamespace(delivery_tag=tag, headers=headers or {})
    return SimpleNamespace(name=name, id=f"id-{tag}", message=message)


def test_a_task_given_back_goes_under_a_new_tag_and_the_old_one_is_superseded(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A dead holder's task goes back to its queue with a fresh delivery tag; its old tag
    is noted superseded in the same transaction, and acknowledging the old copy deletes
    nothing the new one relies on."""
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    frozen = channel.basic_get("celery", no_ack=False)
    old = str(frozen.delivery_tag)
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 2},))
    dead = Redriver(tracker_app, redis_client)
    now = time.time()
    dead.held.note_held([SimpleNamespace(message=frozen)], now - 30)
    assert Redriver(tracker_app, redis_client).dead.restore(now) == 1
    # At the end consumed next (kombu pops from the right): it is the older of the two.
    assert redis_client.llen("celery") == 2
    restored = json.loads(redis_client.lindex("celery", -1))
    assert restored["headers"]["id"] == frozen.headers["id"]
    new = restored["properties"]["delivery_tag"]
    assert new != old
    assert redis_client.zscore(Keys().superseded(), old) == pytest.approx(now, abs=5)
    assert redis_client.hlen("unacked") == 0
    # Another worker fetches the copy: held under the new tag.
    other = tracker_app.connection_for_write()
    again = other.default_channel.basic_get("celery", no_ack=False)
    assert str(again.delivery_tag) == new
    assert redis_client.hkeys("unacked") == [new]
    frozen.ack()  # the woken worker lets go of its copy
    assert redis_client.hkeys("unacked") == [new]
    again.ack()
    assert redis_client.hlen("unacked") == 0
    assert redis_client.llen("celery") == 1
    other.release()
    connection.release()


def test_a_tag_acknowledged_meanwhile_is_not_given_back(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """The give-back reads the unacked hash under WATCH: a task acknowledged before it is
    neither queued again nor noted superseded."""
    tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": 1},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    message = channel.basic_get("celery", no_ack=False)
    tag = str(message.delivery_tag)
    message.ack()
    assert kombu_restore.restore_retagged(channel, tag, Keys().superseded(), time.time()) is None
    assert redis_client.llen("celery") == 0
    assert redis_client.zcard(Keys().superseded()) == 0
    connection.release()


def test_the_fence_asks_redis_only_after_a_gap_in_the_beats(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """While the worker's beats are recent nothing can have been given back from under it:
    no lookup. Recent is under SMSBAT_REDRIVE_AFTER by the clocks' MARGIN, and no longer
    than GONE_AFTER (the others find a dead worker gone that soon, on the server's clock).
    After a gap, a task about to run is looked up; a tracker run never is (its session
    fences it)."""
    keys = Keys()
    redis_client.zadd(keys.superseded(), {"old-tag": time.time()})
    fence = Fence(redis_client, keys, settings.redrive_after)
    assert fence.recent == min(settings.redrive_after - MARGIN, GONE_AFTER) == GONE_AFTER
    assert Fence(redis_client, keys, 2.0).recent == 2.0 - MARGIN
    assert fence.is_recent()
    assert not fence.superseded(_request("old-tag"))
    fence._beat = (fence._beat[0] - 10, fence._beat[1] - 10)  # ten seconds frozen
    assert not fence.is_recent()
    assert fence.superseded(_request("old-tag"))
    assert not fence.superseded(_request("fresh-tag"))
    assert not fence.superseded(_request("old-tag", name=TRACK_TASK))


def test_the_first_beat_after_a_gap_looks_up_everything_held(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The beat after a gap finds the superseded copies among those held and keeps them,
    so that they are skipped once the beats are recent again; a copy no longer held is
    forgotten at the next beat."""
    keys = Keys()
    redis_client.zadd(keys.superseded(), {"old-tag": time.time()})
    fence = Fence(redis_client, keys, settings.redrive_after)
    recent = fence.beat_started()
    assert fence.beat_confirmed(recent, ["old-tag", "new-tag"]) == 0  # no gap: no lookup
    assert not fence.superseded(_request("old-tag"))
    after_gap = (recent[0] + 10, recent[1] + 10)
    with capture_logs() as logs:
        assert fence.beat_confirmed(after_gap, ["old-tag", "new-tag"]) == 1
    assert [e["event"] for e in logs] == ["redrive.superseded_held"]
    fence._beat = fence.beat_started()
    assert fence.is_recent()
    assert fence.superseded(_request("old-tag"))
    assert not fence.superseded(_request("new-tag"))
    fence.beat_confirmed(fence.beat_started(), ["new-tag"])
    assert not fence._superseded


def test_a_beat_that_finds_this_worker_found_dead_looks_up_everything_held(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The others found this worker gone (its connections closed) or dead, though it beat
    a moment ago: its next beat looks up everything it holds, as after a gap."""
    keys = Keys()
    redis_client.zadd(keys.superseded(), {"old-tag": time.time()})
    fence = Fence(redis_client, keys, settings.redrive_after)
    assert fence.beat_confirmed(fence.beat_started(), ["old-tag"]) == 0  # no gap: no lookup
    assert fence.beat_confirmed(fence.beat_started(), ["old-tag"], found_dead=True) == 1
    assert fence.superseded(_request("old-tag"))


def test_an_unreachable_redis_lets_tasks_run_and_is_not_asked_at_each(
    settings: Settings,
) -> None:
    """A lookup that fails lets the task run (the others cannot give anything back
    without Redis either), is logged, and is not tried again for LOOKUP_PAUSE."""
    client = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    fence = Fence(client, Keys(), settings.redrive_after)
    fence._beat = (fence._beat[0] - 10, fence._beat[1] - 10)
    with capture_logs() as logs:
        assert not fence.superseded(_request("a"))
        assert not fence.superseded(_request("b"))
    assert [e["event"] for e in logs] == ["redrive.fence_unreachable"]
    assert fence._paused_until > time.monotonic() + LOOKUP_PAUSE - 1


def test_the_patched_revoked_skips_a_superseded_request_without_a_result() -> None:
    """A request the fence names is skipped as a revoked one is (forgotten by the worker
    and acknowledged), but no REVOKED result or event is sent under the shared task id."""
    calls: list[str] = []

    class FakeRequest(SimpleNamespace):  # the worker's request sets hold weak references
        __hash__ = object.__hash__  # type: ignore[assignment]

    def make(task_id: str) -> Any:
        return FakeRequest(
            name="smsbat_tracker.recipes.record_outcome",
            id=task_id,
            _already_revoked=False,
            expires=None,
            stamped_headers=None,
            acknowledge=lambda: calls.append("ack"),
            send_event=lambda *a, **k: calls.append("event"),
        )

    request = make("shared-id")
    celery_request.install(lambda r: r.id == "shared-id")
    try:
        assert celery_request.installed()
        worker_state.reserved_requests.add(request)
        with capture_logs() as logs:
            assert celery_request_module.Request.revoked(request)
        assert calls == ["ack"]
        assert request not in worker_state.reserved_requests
        assert request._already_revoked
        assert [e["event"] for e in logs] == ["redrive.superseded_skipped"]
        other = make("other")
        assert not celery_request_module.Request.revoked(other)
    finally:
        celery_request.uninstall()
        worker_state.reserved_requests.discard(request)


def test_celery_asks_revoked_before_it_runs_a_task() -> None:
    """What the patch relies on: every path that hands a request to the pool asks
    ``revoked()`` first (the base Request and the per-task class Celery builds), and
    Celery's own skip forgets and acknowledges the request."""
    source = inspect.getsource(celery_request_module)
    assert source.count("if self.revoked():") >= 3  # execute_using_pool x2, execute
    assert "def create_request_cls" in source
    announce = inspect.getsource(getattr(celery_request_module.Request, "_announce_revoked"))  # noqa: B009
    assert "task_ready(self)" in announce
    assert "self.acknowledge()" in announce
    assert "self._already_revoked = True" in announce
    assert list(inspect.signature(celery_request_module.Request.revoked).parameters) == ["self"]


def test_kombu_keeps_what_the_retagged_give_back_relies_on() -> None:
    """kombu's restore_by_tag still is the transaction restore_retagged copies, and the
    delivery tag still travels in the message's properties."""
    restore = inspect.getsource(kombu_redis.QoS.restore_by_tag)
    for part in ("_remove_from_indices(tag, pipe)", "_do_restore_message(", "pipe.multi()"):
        assert part in restore
    # A fetched message takes its delivery tag from its properties.
    message = inspect.getsource(virtual.Message.__init__)
    assert "delivery_tag=properties['delivery_tag']" in message
    # The acknowledgement hook runs on the client kombu's own ack uses, not on the event
    # loop's (a BRPOP may be in flight on that one).
    assert "conn_or_acquire" in inspect.getsource(kombu_redis.QoS.pipe_or_acquire)
    assert "_delivered" in inspect.getsource(virtual.QoS.__init__)
    params = inspect.signature(getattr(kombu_redis.Channel, "_do_restore_message")).parameters  # noqa: B009
    assert list(params) == ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"]


def test_an_unknown_celery_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Celery outside the patch's range, install() patches nothing and says so."""
    monkeypatch.setattr(metadata, "version", lambda package: "6.0.0")
    with pytest.raises(UnsupportedVersion, match="celery"):
        celery_request.install(lambda r: False)
    with pytest.raises(UnsupportedVersion, match="kombu"):
        kombu_restore.require_kombu()


@pytest.mark.slow
def test_a_frozen_worker_that_wakes_up_skips_the_callback_run_by_another(
    settings: Settings, tracker_app: Any, redis_client: redis.Redis
) -> None:
    """SIGSTOP a whole worker holding a callback (a countdown); the other worker gets it
    back after SMSBAT_REDRIVE_AFTER and runs it. SIGCONT: the woken worker's copy is due at
    once, and it skips it. The callback ran once."""
    label = uuid.uuid4().hex[:8]
    log = Path(tempfile.mkdtemp()) / "frozen.log"
    keys = Keys()
    with worker_process(settings, concurrency=1, pool="prefork", log_path=str(log)) as frozen:
        wait_for(lambda: tracker_app.control.ping(timeout=0.5), timeout=60)
        record_outcome.apply_async(({"message_id": "f"},), {"label": label}, countdown=8)
        [tag] = wait_for(lambda: redis_client.hkeys("unacked"), timeout=20)

        def named() -> bool:
            holders = redis_client.zrange(keys.holders(), 0, -1)
            return any(redis_client.sismember(keys.held(str(h)), str(tag)) for h in holders)

        wait_for(named, timeout=10)
        os.killpg(frozen.pid, signal.SIGSTOP)
        try:
            with worker_process(settings, concurrency=1, pool="prefork"):
                [entry] = wait_for(lambda: recorded(redis_client, label), timeout=40)
                assert redis_client.zscore(keys.superseded(), tag) is not None
                os.killpg(frozen.pid, signal.SIGCONT)
                wait_for(lambda: "redrive.superseded_skipped" in log.read_text(), timeout=30)
                # The woken worker answers again: its skip is done, not pending.
                wait_for(lambda: len(tracker_app.control.ping(timeout=0.5)) == 2, timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(frozen.pid, signal.SIGCONT)
    assert entry["task_id"]
    assert len(recorded(redis_client, label)) == 1


@pytest.mark.slow
def test_a_frozen_redis_holds_no_call_past_the_socket_timeout(
    make_settings: Any,
) -> None:
    """SIGSTOP Redis: its connections hang rather than reset. Every client the tracker
    builds (and the broker's and result backend's options) gives up after SOCKET_TIMEOUT
    with an error, and works again once Redis is woken."""
    from bench.workload import free_port

    from smsbat_tracker.store.connections import SOCKET_TIMEOUT, redis_client
    from smsbat_tracker.tools.embedded import PersistentRedis
    from smsbat_tracker.worker import celery_config

    port = free_port()
    with tempfile.TemporaryDirectory() as data, PersistentRedis(port, data) as server:
        settings = make_settings(redis_url=server.url)
        config = celery_config(settings)
        assert config["broker_transport_options"]["socket_timeout"] == SOCKET_TIMEOUT
        assert config["redis_socket_timeout"] == SOCKET_TIMEOUT
        client = redis_client(settings)
        assert client.ping()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.set("k", "v")
            assert SOCKET_TIMEOUT - 0.5 <= time.monotonic() - started <= SOCKET_TIMEOUT + 2
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert wait_for(client.ping, timeout=10)


def test_a_follow_up_that_ran_is_skipped_when_a_copy_comes_back(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A follow-up the tracker sent that ran and was acknowledged is marked (Keys.ran):
    a copy that comes back (a failover whose new master never saw it popped) is skipped,
    beats recent or not. Another follow-up, or a task the tracker did not send, is not
    looked up for it."""
    keys = Keys()
    fence = Fence(redis_client, keys, settings.redrive_after)
    follow_up = {FOLLOW_UP_HEADER: "1"}
    redis_client.set(keys.ran("id-copy"), "1", ex=60)
    assert fence.is_recent()
    assert fence.superseded(_request("copy", headers=follow_up))
    assert not fence.superseded(_request("other", headers=follow_up))
    redis_client.set(keys.ran("id-plain"), "1", ex=60)
    assert not fence.superseded(_request("plain"))


def test_an_acknowledgement_made_late_marks_the_follow_up_too(
    redis_client: redis.Redis,
) -> None:
    """An acknowledgement Redis was away for is made at the next beat, with what the hook
    adds (the receipt note and the mark that it ran), in the same pipeline."""
    from smsbat_tracker.celery.compat import kombu_qos
    from smsbat_tracker.celery.redrive.follow_ups import note_receipt_on_ack

    keys = Keys()
    redis_client.zadd(keys.unreceived(), {"late-id": 1.0})
    redis_client.hset("unacked", "tag-late", "x")
    message = SimpleNamespace(headers={"id": "late-id", FOLLOW_UP_HEADER: "1"})
    qos = SimpleNamespace(
        _delivered={"tag-late": message},
        unacked_index_key="unacked_index",
        unacked_key="unacked",
    )
    forgotten: list[str] = []
    kombu_qos.install(redis_client, before_ack=note_receipt_on_ack(keys))
    try:
        kombu_qos._defer_ack(qos, "tag-late", lambda q, t: forgotten.append(t), OSError("away"))
        assert forgotten == ["tag-late"]
        assert kombu_qos.make_deferred_acks(redis_client) == 1
    finally:
        kombu_qos._BEFORE_ACK.clear()
    assert not redis_client.hexists("unacked", "tag-late")
    assert redis_client.zscore(keys.unreceived(), "late-id") is None
    assert redis_client.exists(keys.ran("late-id"))


def test_celery_marks_a_request_it_handed_to_the_pool() -> None:
    """What ``held.handed_to_pool`` relies on (the tasks a frozen worker runs on waking up,
    past ``revoked()``): both hand-off paths keep the pool's result as ``_apply_result``
    (None before), and a request a pool process started has a ``time_start``."""
    source = inspect.getsource(celery_request_module)
    assert source.count("self._apply_result = maybe(ref, result)") >= 2
    assert celery_request_module.Request._apply_result is None
    assert "self.time_start = " in inspect.getsource(celery_request_module.Request.on_accepted)
