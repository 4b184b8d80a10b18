"""The kombu Redis QoS patch (celery/compat/kombu_qos.py): what it does, and what of
kombu it relies on, so that an upgrade that changes it fails here first."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from smsbat_tracker.celery.compat import kombu_qos
from smsbat_tracker.errors import UnsupportedVersion


def _state(client: redis.Redis) -> dict[str, Any]:
    """Every key of the test database and what it holds."""
    readers: dict[str, Any] = {
        "string": client.get,
        "list": lambda k: client.lrange(k, 0, -1),
        "hash": client.hgetall,
        "set": client.smembers,
        "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
    }
    return {str(key): readers[str(client.type(key))](key) for key in client.keys("*")}


@pytest.fixture
def held(tracker_app: Any, redis_client: redis.Redis) -> Iterator[tuple[Any, list[Any]]]:
    """A channel holding two fetched, unacknowledged messages."""
    for n in range(2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": n},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    messages = [channel.basic_get("celery", no_ack=False) for _ in range(2)]
    assert redis_client.hlen("unacked") == 2
    yield channel, messages
    connection.release()


@pytest.mark.parametrize(
    ("owner", "name", "params"),
    [
        (kombu_redis.QoS, "ack", ["self", "delivery_tag"]),
        (kombu_redis.QoS, "reject", ["self", "delivery_tag", "requeue"]),
        (kombu_redis.QoS, "restore_unacked", ["self", "client"]),
        (kombu_redis.QoS, "restore_by_tag", ["self", "tag", "client", "leftmost"]),
        (kombu_redis.QoS, "pipe_or_acquire", ["self", "pipe", "client"]),
        (kombu_redis.QoS, "_remove_from_indices", ["self", "delivery_tag", "pipe"]),
        (virtual.QoS, "ack", ["self", "delivery_tag"]),
    ],
)
def test_the_patched_and_called_methods_keep_their_signatures(
    owner: type, name: str, params: list[str]
) -> None:
    """kombu's methods the patch replaces or calls take the arguments it passes."""
    method = inspect.unwrap(getattr(owner, name))  # kombu's own, patched or not
    assert list(inspect.signature(method).parameters) == params


def test_a_channels_qos_has_the_attributes_the_patch_reads(held: tuple[Any, list[Any]]) -> None:
    """The delivered map and the two unacked keys, as the patch reads them."""
    channel, messages = held
    qos = channel.qos
    assert isinstance(qos, kombu_redis.QoS)
    assert qos.unacked_key == "unacked"
    assert qos.unacked_index_key == "unacked_index"
    delivered: Any = qos._delivered
    assert {str(m.delivery_tag) for m in messages} <= {str(t) for t in delivered}


def test_kombus_ack_makes_the_two_deletions_the_live_client_ack_makes(
    held: tuple[Any, list[Any]], redis_client: redis.Redis
) -> None:
    """The patch acknowledges on a live client as kombu does: the same keys change."""
    channel, (first, second) = held
    before = _state(redis_client)
    inspect.unwrap(kombu_redis.QoS.ack)(channel.qos, first.delivery_tag)
    by_kombu = _state(redis_client)
    kombu_qos._ACK_CLIENT["client"] = redis_client
    kombu_qos._ack_on_live_client(channel.qos, second.delivery_tag, virtual.QoS.ack)
    by_patch = _state(redis_client)
    changed_by_kombu = {k for k in before if before.get(k) != by_kombu.get(k)}
    changed_by_patch = {k for k in by_kombu if by_kombu.get(k) != by_patch.get(k)}
    assert changed_by_kombu == changed_by_patch
    assert changed_by_patch <= {"unacked", "unacked_index"}
    assert by_patch.get("unacked", {}) == {}
    # Both forgotten in this process alike (kombu's virtual ack marks them dirty).
    assert {first.delivery_tag, second.delivery_tag} <= channel.qos._dirty


def test_kombu_raises_attribute_error_on_a_torn_down_channel(held: tuple[Any, list[Any]]) -> None:
    """What the patch catches: kombu's own ack, reject and restore on a channel whose
    connection the consumer tore down raise AttributeError."""
    channel, (first, _) = held
    live, pool = channel.connection, channel._pool
    channel.connection = channel._pool = None
    try:
        for name, args in (
            ("ack", (first.delivery_tag,)),
            ("reject", (first.delivery_tag, False)),
            ("restore_unacked", ()),
        ):
            with pytest.raises(AttributeError):
                inspect.unwrap(getattr(kombu_redis.QoS, name))(channel.qos, *args)
    finally:
        channel.connection, channel._pool = live, pool


def test_an_unknown_kombu_version_is_refused_and_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> None:
    """A kombu outside the known range: UnsupportedVersion, and kombu left as it was."""
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "5.99.0" if name == "kombu" else real(name)
    )

    def unpatched(*args: Any) -> None:
        raise AssertionError("not called")

    for name in ("ack", "reject", "restore_unacked"):
        monkeypatch.setattr(kombu_redis.QoS, name, unpatched)
    monkeypatch.setattr(kombu_qos, "_ACK_CLIENT", {})
    with pytest.raises(UnsupportedVersion) as raised:
        kombu_qos.install(redis_client)
    assert raised.value.package == "kombu"
    assert raised.value.supported == f">={kombu_qos.LOWEST},<{kombu_qos.BELOW}"
    for name in ("ack", "reject", "restore_unacked"):
        assert getattr(kombu_redis.QoS, name) is unpatched
    assert not kombu_qos.installed()
    assert kombu_qos._ACK_CLIENT == {}


def test_nothing_is_patched_at_import() -> None:
    """Importing the patch module changes nothing; install() does, once (in a fresh
    interpreter: this one's kombu is patched by the other tests)."""

    code = (
        "from kombu.transport import redis as r\n"
        "from smsbat_tracker.celery.compat import kombu_qos\n"
        "assert not kombu_qos.installed()\n"
        "kombu_qos.install(); ack = r.QoS.ack\n"
        "kombu_qos.install(); assert r.QoS.ack is ack and kombu_qos.installed()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_worker_survives_kombus_restore_on_a_torn_down_connection() -> None:
    """kombu's restore at channel close raising AttributeError no longer kills the worker."""
    from kombu.transport import redis as kombu_redis

    kombu_qos.install()
    kombu_qos.install()  # idempotent

    def torn_down(client: Any) -> Any:
        # What kombu's _connparams raises once the connection's client is gone.
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    qos = SimpleNamespace(_delivered={"t1": 1}, channel=SimpleNamespace(conn_or_acquire=torn_down))
    kombu_redis.QoS.restore_unacked(qos)  # type: ignore[arg-type]  # returns: the tasks stay unacked, the worker lives


def test_a_task_finished_across_a_reconnect_is_acknowledged(
    tracker_app: Any, redis_client: redis.Redis
) -> None:
    """A task that ran while Redis went away is acknowledged after the reconnect, on the
    torn-down channel: kombu's AttributeError no longer stops the worker, and the ack is
    made on a live client, so the finished task is not given back to run again."""
    kombu_qos.install(redis_client)
    for n in range(2):
        tracker_app.send_task("smsbat_tracker.recipes.record_outcome", args=({"x": n},))
    connection = tracker_app.connection_for_write()
    channel = connection.default_channel
    finished, requeued = (channel.basic_get("celery", no_ack=False) for _ in range(2))
    assert redis_client.hlen("unacked") == 2
    # What the consumer's close leaves: no connection, no pool.
    live, pool = channel.connection, channel._pool
    channel.connection = channel._pool = None
    finished.ack()
    requeued.reject(requeue=True)
    channel.connection, channel._pool = live, pool
    assert redis_client.hlen("unacked") == 0
    assert redis_client.zcard("unacked_index") == 0
    assert redis_client.llen("celery") == 1  # the rejected one, given back
    connection.release()


def _mark_hook(pipe: Any, headers: dict[str, Any]) -> None:
    pipe.set(f"acked:{headers['id']}", 1)


def _hooked_ack(channel: Any, message: Any) -> None:
    """The patch's acknowledgement of ``message`` (with whatever hook is set)."""
    kombu_qos._ack_with_hook(
        channel.qos,
        message.delivery_tag,
        kombu_qos._headers(channel.qos, message.delivery_tag),
        inspect.unwrap(kombu_redis.QoS.ack),
        virtual.QoS.ack,
    )


def test_an_ack_with_a_hook_makes_kombus_deletions_and_the_hooks_writes_together(
    held: tuple[Any, list[Any]], redis_client: redis.Redis
) -> None:
    """With a hook, an acknowledgement sends the hook's writes in kombu's own ack
    transaction (a replica that has the ack has the writes too): the same deletions as
    kombu's ack, the hook's key, and the delivery forgotten in this process."""
    channel, (first, second) = held
    saved = dict(kombu_qos._BEFORE_ACK)
    kombu_qos._BEFORE_ACK["hook"] = _mark_hook
    try:
        before = _state(redis_client)
        _hooked_ack(channel, first)
    finally:
        kombu_qos._BEFORE_ACK.clear()
        kombu_qos._BEFORE_ACK.update(saved)
    after = _state(redis_client)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"unacked", "unacked_index", f"acked:{first.headers['id']}"}
    assert list(after["unacked"]) == [second.delivery_tag]
    assert first.delivery_tag in channel.qos._dirty


def test_acks_made_just_before_an_outage_are_made_again_after_it(
    held: tuple[Any, list[Any]], redis_client: redis.Redis
) -> None:
    """A promoted replica may lack the last writes of the master that died: the acks made
    since a moment are made again, hook included, where they were lost; those forgotten
    (before a beat that reached Redis) are not."""
    channel, (first, second) = held
    kombu_qos.forget_acks_before(float("inf"))
    saved = dict(kombu_qos._BEFORE_ACK)
    kombu_qos._BEFORE_ACK["hook"] = _mark_hook
    try:
        lost = _state(redis_client)  # what the new master has: neither ack
        moment = time.monotonic()
        for message in (first, second):
            _hooked_ack(channel, message)
        acked = _state(redis_client)
        redis_client.flushdb()
        for key, value in lost.items():  # the failover: the acks are gone
            if key == "unacked":
                redis_client.hset(key, mapping=value)
            elif key == "unacked_index":
                redis_client.zadd(key, dict(value))
            elif isinstance(value, list):
                redis_client.rpush(key, *value)
        assert kombu_qos.replay_acks_since(redis_client, moment) == 2
        assert _state(redis_client) == acked
        kombu_qos.forget_acks_before(float("inf"))
        assert kombu_qos.replay_acks_since(redis_client, moment) == 0
    finally:
        kombu_qos._BEFORE_ACK.clear()
        kombu_qos._BEFORE_ACK.update(saved)
