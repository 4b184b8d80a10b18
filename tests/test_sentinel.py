"""Redis through Sentinel: one ``REDIS_URL`` for the broker, the result backend, the cache and
the rate limit, and a real master failover under 100 trackings.

The unit tests need no server. The others run Debian's ``redis-server`` and
``redis-sentinel`` (one master, one replica, three sentinels on loopback) and are skipped,
naming the missing binary, when those are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import collections
import json
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from bench.sentinel_cluster import DOWN_AFTER_MS, SentinelCluster
from celery import Celery
from celery.backends.redis import SentinelBackend
from kombu import Connection

from smsbat_tracker.celery.integration import DEFAULT_QUEUE
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.cli import main
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.redis_url import SentinelURL, is_sentinel_url, parse_sentinel_url
from smsbat_tracker.store.connections import SentinelRedis, redis_client
from smsbat_tracker.store.keys import KOMBU_PRIORITY_STEPS, Keys, kombu_queue_list
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.workers import worker_process
from smsbat_tracker.worker import celery_config
from tests.conftest import recorded, run_worker_cli, wait_for

PASSWORD = "pw-sentinel-MARKER"
THREE = (
    f"sentinel://:{PASSWORD}@10.0.0.1:26379/2;"
    f"sentinel://:{PASSWORD}@10.0.0.2:26380/2;"
    f"sentinel://:{PASSWORD}@10.0.0.3:26381/2"
)


# --- the URL and the clients (no server) ----------------------------------------------------


def test_a_sentinel_url_names_every_sentinel_and_the_master_db_and_password() -> None:
    """The ';' list parses into its sentinels in order, the database and the (unquoted)
    master credentials; the password stays out of the repr."""
    parsed = parse_sentinel_url(THREE)
    assert parsed == SentinelURL(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26381)),
        db=2,
        password=PASSWORD,
    )
    assert PASSWORD not in repr(parsed)
    single = parse_sentinel_url("sentinel://app%40x:p%3Bw@h:26379")
    assert (single.db, single.username, single.password) == (0, "app@x", "p;w")
    assert is_sentinel_url("sentinel://h:1")
    assert not is_sentinel_url("redis://h:6379/0")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sentinel://h1:26379;redis://h2:6379", "must start with sentinel://"),
        ("sentinel://h1:26379;", "empty"),
        ("sentinel://:26379", "must name a host"),
        ("sentinel://h1", "must name its port"),
        ("sentinel://h1:notaport", "invalid sentinel port"),
        ("sentinel://h1:99999", "invalid sentinel port"),
        ("sentinel://h1:26379/x", "database"),
        ("sentinel://h1:26379/0?ssl=1", "query"),
        (f"sentinel://:{PASSWORD}@h1:26379;sentinel://h2:26379", "same user, password"),
        ("sentinel://h1:26379/1;sentinel://h2:26379/2", "same user, password and database"),
    ],
)
def test_a_bad_sentinel_url_says_what_is_wrong_without_quoting_it(url: str, reason: str) -> None:
    """Each malformed part is refused with the reason, never with the URL (it may carry a
    password). Parts that disagree on the password or database are refused: kombu switches
    to the next part after a connection error and reads that part's own."""
    with pytest.raises(ValueError, match=reason) as info:
        parse_sentinel_url(url)
    assert PASSWORD not in str(info.value)
    assert "h1" not in str(info.value)


def sentinel_settings(**overrides: Any) -> Settings:
    """Settings with the three-sentinel URL (nothing is reached)."""
    return load_settings(credentials=False, redis_url=THREE, **overrides)


def test_redis_client_asks_the_sentinels_for_the_master_with_the_master_password() -> None:
    """For sentinel:// the client is a master_for() client of SMSBAT_SENTINEL_MASTER with
    the URL's database, password and the caller's options; the sentinels get the socket
    options only, never the password (as kombu's and Celery's do); close() closes them."""
    client = redis_client(
        sentinel_settings(sentinel_master="billing"),
        decode_responses=True,
        socket_timeout=2,
        health_check_interval=30,
    )
    assert isinstance(client, SentinelRedis)
    pool: Any = client.connection_pool
    assert pool.service_name == "billing"
    assert pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"]) == (2, PASSWORD, True)
    assert (kwargs["socket_timeout"], kwargs["health_check_interval"]) == (2, 30)
    manager = client.sentinel_manager
    assert manager is not None
    nodes = [node.connection_pool.connection_kwargs for node in manager.sentinels]
    assert [(n["host"], n["port"]) for n in nodes] == [
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("10.0.0.3", 26381),
    ]
    for node in nodes:
        assert node.get("password") is None
        assert node["socket_timeout"] == 2
        assert not node.get("decode_responses")
    client.close()
    assert client.sentinel_manager is None


def test_redis_client_of_a_redis_url_is_the_plain_client() -> None:
    """redis://, rediss:// and unix:// URLs keep redis-py's own from_url client."""
    settings = load_settings(credentials=False, redis_url="redis://:pw@h:6380/3")
    client = redis_client(settings, decode_responses=True)
    assert type(client) is redis.Redis
    assert client.connection_pool.connection_kwargs["db"] == 3
    client.close()


def test_celery_gets_the_master_name_for_broker_and_result_backend() -> None:
    """With sentinel:// both transport options carry master_name (kombu's SentinelChannel
    and Celery's SentinelBackend read it there); without, neither has it."""
    conf = celery_config(sentinel_settings(sentinel_master="billing"))
    assert conf["broker_url"] == conf["result_backend"] == THREE
    assert conf["broker_transport_options"]["master_name"] == "billing"
    assert conf["result_backend_transport_options"]["master_name"] == "billing"
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600
    plain = celery_config(load_settings(credentials=False))
    assert "master_name" not in plain["broker_transport_options"]
    assert "master_name" not in plain["result_backend_transport_options"]


def test_kombu_and_celery_read_the_url_as_the_tracker_does() -> None:
    """kombu's broker connection (on every sentinel it may switch to) and Celery's result
    backend find the same sentinels, database and master password as redis_client."""
    settings = sentinel_settings()
    ours = parse_sentinel_url(settings.redis_url)
    with Connection(settings.redis_url, transport_options={"master_name": "mymaster"}) as conn:
        assert conn.transport_cls == "sentinel"
        seen = []
        for _ in ours.sentinels:
            seen.append((conn.hostname, conn.port))
            assert conn.password == PASSWORD
            assert conn.transport.channel_errors is not None  # the sentinel transport loads
            assert conn.virtual_host in ("2", "/2")
            conn.maybe_switch_next()
        assert tuple(seen) == ours.sentinels
    app = Celery("sentinel-probe", set_as_current=False)
    app.conf.update(celery_config(settings))
    backend = SentinelBackend(app=app, url=settings.redis_url)
    params = backend.connparams
    assert [(h["host"], h["port"]) for h in params["hosts"]] == list(ours.sentinels)
    assert (params["db"], params["password"]) == (ours.db, PASSWORD)
    assert backend._transport_options["master_name"] == "mymaster"
    assert PASSWORD not in backend.as_uri()
    app.close()


def test_the_engine_of_a_sentinel_app_uses_the_sentinel_client(
    make_settings: Callable[..., Settings],
) -> None:
    """The worker's engine (status cache, rate limit, sessions) is built on redis_client:
    the one setting reaches it."""
    from smsbat_tracker.worker import create_app

    tracker = create_app(make_settings(redis_url=THREE))
    try:
        assert isinstance(tracker.engine.redis, SentinelRedis)
    finally:
        tracker.close_engine()


# --- a real master, replica and three sentinels ---------------------------------------------


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A real master, replica and three sentinels (quorum 2), stopped afterwards."""
    for binary in ("redis-server", "redis-sentinel"):
        if shutil.which(binary) is None:
            pytest.skip(
                f"{binary} is not on the PATH: install the Debian packages redis-server and "
                "redis-sentinel (.ci/run does) to run the Sentinel tests"
            )
    cluster = SentinelCluster(root=tmp_path, password=secrets.token_hex(12))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_every_redis_user_reaches_the_master_through_the_sentinels(
    sentinel_cluster: SentinelCluster,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """From the one REDIS_URL: the tracker's client, kombu's broker channel and Celery's
    result backend all write to the master the sentinels name (password-protected; the
    sentinels have none), and `check-config --ping` reaches it, naming every sentinel and
    no password."""
    cluster = sentinel_cluster
    settings = make_settings(redis_url=cluster.url)
    client = redis_client(settings, decode_responses=True)
    app = Celery("sentinel-probe", set_as_current=False)
    app.conf.update(celery_config(settings))
    try:
        client.set("probe:cache", "1")
        with Connection(
            settings.redis_url, transport_options=app.conf.broker_transport_options
        ) as conn:
            queue = conn.SimpleQueue("probe-queue")
            queue.put({"n": 1})
            assert queue.get(timeout=5).payload == {"n": 1}
            queue.close()
        app.backend.set("probe:result", "2")
        with cluster.client(cluster.master_port) as master:
            assert master.get("probe:cache") == "1"
            assert master.get("probe:result") == "2"
            assert master.exists("_kombu.binding.probe-queue")
        monkeypatch.chdir(cluster.root)
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        assert main(["check-config", "--ping"]) == 0
        out = capsys.readouterr().out
        assert f"redis: ok (sentinel://127.0.0.1:{cluster.sentinel_ports[0]}/0;" in out
        assert cluster.password not in out
    finally:
        client.close()
        app.close()


def _digest(client: redis.Redis, keys: Keys, ids: list[str], label: str) -> tuple[Any, ...]:
    """What tracking steps write: each session's run and checks, each outcome, the records."""
    pipe = client.pipeline(transaction=False)
    for mid in ids:
        pipe.hmget(keys.session(mid), ["run", "checks"])
        pipe.exists(keys.outcome(mid))
    pipe.llen(f"{keys.prefix}:recorded:{label}")
    return tuple(map(str, pipe.execute()))


def _leftovers(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """What could still run: trackings due, follow-ups unreceived, tasks queued or unacked."""
    queues = [kombu_queue_list(DEFAULT_QUEUE, p) for p in KOMBU_PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.due()).zcard(keys.unreceived()).hlen("unacked")
    for queue in queues:
        pipe.llen(queue)
    names = [keys.due(), keys.unreceived(), "unacked", *queues]
    return {name: n for name, n in zip(names, pipe.execute(), strict=True) if n}


def _only_stale_runs_left(client: redis.Redis, keys: Keys) -> bool:
    """Nothing left to run but tracking runs held unacked (a callback never is for long)."""
    if set(_leftovers(client, keys)) - {"unacked"}:
        return False
    tasks = {json.loads(raw)[0]["headers"]["task"] for raw in client.hvals("unacked")}
    return tasks <= {"smsbat_tracker.track_message"}


# How each of the 100 messages ends: (final status or None for never, seconds to it).
FINALS = ("delivered",) * 6 + ("undeliverable",) * 2 + ("permanenterror", None)
DEADLINE = 25.0


@pytest.mark.slow
def test_a_master_failover_under_100_trackings_loses_and_doubles_nothing(
    sentinel_cluster: SentinelCluster,
    make_settings: Callable[..., Settings],
    tracker_app: Any,
    sandbox: SandboxServer,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The master is SIGKILLed while two prefork workers track 100 messages through the
    sentinels; the sentinels promote the replica. Every outcome is the sandbox's (delivered,
    undeliverable, permanenterror, or timeout for the never-final ones), each callback ran
    once, even after the runs the connection loss left unacked are given back (as the
    visibility timeout would, an hour later), both workers lived through it, and the
    password never reached a log line. The time from the kill to the promotion, to the
    first tracking step written on the new master and to the last outcome is printed
    (``-s`` or ``-rP``) and recorded (``record_property``)."""
    cluster = sentinel_cluster
    defaults = Settings.model_fields
    # The test speed-ups of every other end-to-end test; the visibility timeout and the
    # global rate limit at their defaults.
    # Celery's per-task lines too: should a callback ever run twice, the workers' logs
    # (in tmp_path) say which copy ran where.
    settings = make_settings(
        redis_url=cluster.url, rate_limit=defaults["rate_limit"].default, task_log_lines=True
    )
    assert settings.visibility_timeout == 3600
    assert settings.sentinel_master == cluster.master_name
    tracker_app.reconfigure(settings)
    keys = Keys(settings.key_prefix)
    label = uuid.uuid4().hex[:8]
    done = record_outcome.s(label=label)
    ids = [
        sandbox.state.create_scripted(
            [("processing", 0)] + ([(final, 1.0 + (n * 7) % 90 / 10)] if final else [])
        )
        for n, final in ((n, FINALS[n % len(FINALS)]) for n in range(100))
    ]
    # Read on the replica: frozen from the kill until it is promoted, the master after.
    replica = cluster.client(cluster.replica_port)
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    try:
        with (
            worker_process(settings, concurrency=3, pool="prefork", log_path=str(logs[0])) as one,
            worker_process(settings, concurrency=3, pool="prefork", log_path=str(logs[1])) as two,
        ):
            wait_for(lambda: len(tracker_app.control.ping(timeout=0.5)) >= 2, timeout=60)
            for mid in ids:
                track_message.delay(
                    mid, deadline=DEADLINE, on_delivered=done, on_failed=done, on_timeout=done
                )
            wait_for(lambda: len(recorded(replica, label)) >= 40, timeout=30)
            cluster.kill_master()
            killed, killed_at = time.monotonic(), time.time()
            frozen = _digest(replica, keys, ids, label)
            before = len(recorded(replica, label))
            wait_for(lambda: cluster.master_port_now() == cluster.replica_port, timeout=60)
            promoted = time.monotonic() - killed
            wait_for(lambda: _digest(replica, keys, ids, label) != frozen, timeout=60)
            resumed = time.monotonic() - killed
            wait_for(lambda: replica.llen(keys.prefix + f":recorded:{label}") >= 100, timeout=90)
            finished = time.monotonic() - killed
            # Left unacked once the rest has run (a callback still running is unacked for a
            # moment): runs a worker had fetched when the connection broke, re-driven since
            # under new task ids. The visibility timeout would give them back in an hour;
            # give them back now: each must stop without a request or a callback.
            try:
                wait_for(lambda: _only_stale_runs_left(replica, keys), timeout=60)
            except AssertionError:
                stale = [json.loads(raw)[0]["headers"] for raw in replica.hvals("unacked")]
                left = _leftovers(replica, keys)
                raise AssertionError(
                    f"still to run: {left}; unacked: {[(h['task'], h['id']) for h in stale]}"
                ) from None
            with tracker_app.connection_for_write() as connection:
                qos: Any = connection.default_channel.qos
                for tag in replica.hkeys("unacked"):
                    qos.restore_by_tag(tag, leftmost=True)
            wait_for(lambda: not _leftovers(replica, keys), timeout=60)
            # Neither worker died of it (kombu's channel close after a lost master).
            assert one.poll() is None
            assert two.poll() is None
            entries = recorded(replica, label)
    finally:
        replica.close()
    counts = collections.Counter(e["result"]["message_id"] for e in entries)
    doubled = sorted(mid for mid, n in counts.items() if n > 1)
    wrong = {}
    late = 0.0  # the most an outcome due after the kill came after it was due
    for mid in ids:
        truth = sandbox.state.truth(mid)
        if truth["final_at"] is not None:
            assert truth["final_at"] - truth["created_at"] < DEADLINE - 10  # never borderline
        expected = truth["final_status"] or "timeout"
        mine = [e for e in entries if e["result"]["message_id"] == mid]
        if [e["result"]["outcome"] for e in mine] != [expected]:
            wrong[mid] = (expected, [e["result"]["outcome"] for e in mine])
            continue
        started = datetime.fromisoformat(mine[0]["result"]["started_at"]).timestamp()
        due_at = truth["final_at"] or started + DEADLINE
        if due_at > killed_at:
            late = max(late, mine[0]["recorded_at"] - due_at)
    figures = {
        "promoted_s": round(promoted, 2),
        "resumed_s": round(resumed, 2),
        "last_outcome_s": round(finished, 2),
        "worst_late_s": round(late, 2),
        "outcomes_before_kill": before,
        "right": 100 - len(wrong),
        "doubled": len(doubled),
    }
    for name, value in figures.items():
        record_property(f"sentinel_failover_{name}", value)
    print(
        f"\nsentinel failover (down-after {DOWN_AFTER_MS} ms): promoted {promoted:.2f} s, "
        f"first tracking step on the new master {resumed:.2f} s, last outcome {finished:.2f} s "
        f"after the kill ({before} outcomes before it; an outcome due after it came at most "
        f"{late:.2f} s late); {100 - len(wrong)}/100 right, {len(doubled)} doubled"
    )
    assert doubled == []
    assert wrong == {}
    assert set(counts) == set(ids)
    assert resumed < 30
    for log in logs:
        assert cluster.password not in log.read_text(errors="replace")


def test_a_worker_given_a_master_name_no_sentinel_watches_stops_with_one_line(
    sentinel_cluster: SentinelCluster, tmp_path: Path
) -> None:
    """A typo in SMSBAT_SENTINEL_MASTER would retry quietly for good: the sentinels answer
    but watch no such master, so the worker stops at start with one line naming the
    variable and the masters they watch (never a password, never a traceback)."""
    from smsbat_tracker.store.connections import known_masters

    cluster = sentinel_cluster
    right = Settings(redis_url=cluster.url, sentinel_master=cluster.master_name, api_key="k")
    assert known_masters(right) == {cluster.master_name}
    proc = run_worker_cli(
        tmp_path, REDIS_URL=cluster.url, SMSBAT_SENTINEL_MASTER="typo", SMSBAT_API_KEY="k"
    )
    assert proc.returncode != 0
    line = (
        "SMSBAT_SENTINEL_MASTER=typo: the sentinels watch no master by that name "
        f"(they watch: {cluster.master_name})"
    )
    assert line in proc.stderr
    assert "Traceback" not in proc.stderr
    assert cluster.password not in proc.stderr + proc.stdout
