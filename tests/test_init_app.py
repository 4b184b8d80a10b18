"""The tracker inside a user's own Celery app: ``init_app(app)``, and nothing at import.

The end-to-end tests write a small project (``shop.py``: ``Celery("shop")``, ``init_app``,
one ``@app.task`` callback) and run it as its users would: only ``celery -A shop worker``,
then ``celery -A shop flower``, real Redis and the sandbox API.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis
from bench.workload import free_port
from celery import Celery
from celery._state import get_current_app
from kombu.exceptions import OperationalError

import smsbat_tracker
from smsbat_tracker.celery.names import TRACK_TASK
from smsbat_tracker.config import Settings
from smsbat_tracker.errors import ConfigError, NotInitialised
from smsbat_tracker.store.keys import Keys
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.workers import stop_process_group
from tests.conftest import kept, wait_for

SHOP = textwrap.dedent(
    """
    import json
    import os

    import redis
    from celery import Celery

    import smsbat_tracker

    app = Celery("shop", broker=os.environ["REDIS_URL"])
    smsbat_tracker.init_app(app)


    @app.task(name="shop.mark_notified", acks_late=True, shared=False)
    def mark_notified(result, order_id):
        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        entry = {"order_id": order_id, "outcome": result["outcome"]}
        client.rpush("shop:notified", json.dumps(entry))
        client.close()
    """
)


@pytest.fixture
def shop(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ModuleType]:
    """The shop project on disk, imported in this process as its web process would."""
    sandbox.state.reset()
    (tmp_path / "shop.py").write_text(SHOP)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = get_current_app()
    module = importlib.import_module("shop")
    try:
        yield module
    finally:
        smsbat_tracker.tracker_of(module.app).close()
        module.app.close()
        sys.modules.pop("shop", None)
        previous.set_current()


LOGIN = ("shop", "flower-login")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        "FLOWER_BASIC_AUTH": ":".join(LOGIN),
    }


@contextlib.contextmanager
def _celery(tmp_path: Path, *args: str, log: str) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A shop ARGS`` in ``tmp_path``; stopped (SIGTERM, then SIGKILL) on exit."""
    with open(tmp_path / log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "shop", *args],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process_group(proc)


def _worker(tmp_path: Path, name: str) -> contextlib.AbstractContextManager[Any]:
    return _celery(
        tmp_path,
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
        log=f"{name}.log",
    )


def _notified(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange("shop:notified", 0, -1)]


def test_init_app_refuses_a_broker_that_is_not_redis() -> None:
    """Redis is required as the broker: any other is refused with one line saying why."""
    app = Celery("amqp-shop", broker="amqp://guest@localhost//", set_as_current=False)
    with pytest.raises(ConfigError, match=r"broker_url: smsbat-tracker needs Redis") as info:
        smsbat_tracker.init_app(app)
    assert "\n" not in str(info.value)
    assert "amqp" in str(info.value)
    assert smsbat_tracker.init_app.__module__ == "smsbat_tracker.celery.integration"
    with pytest.raises(NotInitialised):
        smsbat_tracker.tracker_of(app)
    app.close()


def test_init_app_takes_the_broker_and_keeps_the_apps_settings(redis_url: str) -> None:
    """The tracker keeps its state in the app's broker; the app's own routes and
    transport options stay, the tracker's routes come after them."""
    own_route = {"shop.*": {"queue": "shop"}}
    app = Celery("shop-settings", broker=redis_url, set_as_current=False)
    app.conf.task_routes = own_route
    app.conf.broker_transport_options = {"visibility_timeout": 7200}
    tracker = smsbat_tracker.init_app(app, deadline=300)
    try:
        assert tracker.settings.redis_url == redis_url
        assert tracker.settings.deadline == 300
        assert tracker.settings.visibility_timeout == 7200
        assert app.conf.broker_transport_options["visibility_timeout"] == 7200
        assert app.conf.task_routes[0] is own_route
        assert app.amqp.router.route({}, TRACK_TASK)["priority"] == 6
        assert smsbat_tracker.init_app(app) is tracker  # once per app
        with pytest.raises(ConfigError, match="redis_url"):
            smsbat_tracker.init_app(
                Celery("other", broker=redis_url, set_as_current=False),
                redis_url="redis://elsewhere:6379/0",
            )
    finally:
        tracker.close()
        app.close()


def test_init_app_rebuilds_the_routing_an_app_already_built(redis_url: str) -> None:
    """Celery builds an app's queues, default queue and router once, on first use, and
    caches them (its AMQP's cached properties, which ``configure`` drops): an app that
    routed a task before ``init_app`` still sends the tracker's tasks to SMSBAT_QUEUE."""
    app = Celery("shop-used", broker=redis_url, set_as_current=False)
    assert app.amqp.router.route({}, TRACK_TASK)["queue"].name == "celery"
    assert app.amqp.default_queue.name == "celery"
    assert {"queues", "default_queue", "router"} <= set(vars(app.amqp))  # cached upstream
    tracker = smsbat_tracker.init_app(app, queue="tracking")
    try:
        route = app.amqp.router.route({}, TRACK_TASK)
        assert route["queue"].name == "tracking"
        assert route["priority"] == 6
        assert list(app.amqp.queues) == ["celery", "tracking"]
        assert app.amqp.default_queue.name == "celery"
    finally:
        tracker.close()
        app.close()


def test_the_trackers_secrets_never_reach_its_log_lines(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After init_app, the API key is redacted from the package's lines wherever they go:
    here a host that never configured structlog, through the standard library."""
    from smsbat_tracker.log import get_logger

    secret = "sk_live_init_app_MARKER"
    app = Celery("secretive", broker=redis_url, set_as_current=False)
    tracker = smsbat_tracker.init_app(app, api_key=secret)
    try:
        with caplog.at_level("INFO", logger="smsbat_tracker.probe"):
            get_logger("smsbat_tracker.probe").info("probe", detail=f"calling with {secret}")
    finally:
        tracker.close()
        app.close()
    assert "probe" in caplog.text
    assert secret not in caplog.text


def test_importing_the_package_builds_no_app_and_touches_nothing() -> None:
    """Importing the package, its tasks and its test kit connects no signal receiver,
    patches no billiard or kombu class, configures no logging, and builds no app."""
    probe = textwrap.dedent(
        """
        import logging, structlog
        from billiard import einfo
        from celery import signals
        from kombu.transport import redis as kombu_redis

        def receivers():
            return {name: len(getattr(signals, name).receivers or ()) for name in dir(signals)
                    if hasattr(getattr(signals, name), "receivers")}

        before = (receivers(), list(logging.getLogger().handlers), einfo.Traceback.__init__,
                  kombu_redis.QoS.ack)
        import smsbat_tracker, smsbat_tracker.tools.recipes
        import smsbat_tracker.celery.campaigns, smsbat_tracker.celery.track
        from smsbat_tracker import track_message, track_campaign, init_app
        after = (receivers(), list(logging.getLogger().handlers), einfo.Traceback.__init__,
                 kombu_redis.QoS.ack)
        assert before == after, (before, after)
        assert not structlog.is_configured()
        from celery import _state
        assert not [a for a in _state._get_active_apps() if a.main == "smsbat_tracker"]
        print("untouched")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "untouched"


def test_enqueue_through_an_app_without_the_tracker_is_refused(redis_url: str) -> None:
    """``track_message.delay`` through an app that never called init_app raises one clear
    error naming the call to make; nothing is published."""
    from smsbat_tracker import track_message

    previous = get_current_app()
    app = Celery("plain", broker=redis_url)
    try:
        with pytest.raises(NotInitialised, match=r"Celery app 'plain'.*init_app\(app\)"):
            track_message.delay("a" * 24)
    finally:
        app.close()
        previous.set_current()


def test_enqueue_with_redis_down_raises_what_celery_users_catch(shop: ModuleType) -> None:
    """With Redis away, ``.delay()`` raises kombu's OperationalError (what Celery users
    catch for a broker outage), not redis-py's ConnectionError."""
    from smsbat_tracker import track_message

    tracker = smsbat_tracker.tracker_of(shop.app)
    tracker.use(tracker.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    with pytest.raises(OperationalError, match="Redis unavailable"):
        track_message.delay("a" * 24)


def test_a_callback_the_app_does_not_know_is_refused_at_enqueue(shop: ModuleType) -> None:
    """A callback task that the tracking app's workers would discard as unregistered is
    refused at enqueue, naming the argument and the task; routed elsewhere, it passes."""
    from celery import signature

    from smsbat_tracker import track_message

    stranger = signature("elsewhere.unknown_task", args=("order-1",))
    with pytest.raises(ValueError, match=r"on_delivered: task 'elsewhere.unknown_task'"):
        track_message.delay("a" * 24, on_delivered=stranger)
    routed = stranger.clone()
    routed.set(queue="elsewhere")
    result = track_message.delay("b" * 24, on_delivered=routed)
    assert result.id


@pytest.mark.slow
def test_a_shop_app_tracks_with_its_own_worker_through_a_sigkill(
    shop: ModuleType,
    tmp_path: Path,
    redis_client: redis.Redis,
    sandbox: SandboxServer,
) -> None:
    """Only ``celery -A shop worker`` runs. Each message's callback, the shop's own
    ``@app.task``, runs once with the right outcome, though the worker is SIGKILLed mid-way
    and another started; the worker's log is the host's (no JSON lines of ours)."""
    from smsbat_tracker import track_message

    with _worker(tmp_path, "first") as first:
        wait_for(lambda: shop.app.control.ping(timeout=0.5), timeout=60)
        # Scripted from now, once the worker is up: a message's timeline starts when it is
        # made, and a slow start-up must not let any of them be final before the kill.
        delivered = [
            sandbox.state.create_scripted([("processing", 0), ("delivered", 3.0 + 0.2 * i)])
            for i in range(6)
        ]
        failed = [sandbox.state.create_scripted([("processing", 0), ("undeliverable", 3.5)])]
        orders = {mid: f"order-{i}" for i, mid in enumerate(delivered + failed)}
        for mid, order in orders.items():
            track_message.delay(
                mid,
                deadline=30,
                on_delivered=shop.mark_notified.s(order),
                on_failed=shop.mark_notified.s(order),
            )
        # Killed once every tracking has been checked at least once, before any is final.
        wait_for(lambda: all(sandbox.state.truth(m)["polls"] >= 1 for m in orders), timeout=20)
        assert _notified(redis_client) == []
        assert redis_client.zcard(Keys("smsbat").due()) == len(orders)  # all in flight
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    with _worker(tmp_path, "second"):
        wait_for(lambda: len(_notified(redis_client)) >= len(orders), timeout=60)
        # Every tracking has ended (the due index is empty) and no callback waits in the
        # queue. The dead worker's countdowns, held unacked, come back only after the
        # visibility timeout, and then stop at once: their sessions have new owners.
        due = Keys("smsbat").due()
        wait_for(lambda: redis_client.zcard(due) == 0 and redis_client.llen("celery") == 0)
        notified = _notified(redis_client)
        # Each tracking is cut back to its outcome, every subscription served.
        wait_for(lambda: all(kept(redis_client, mid)[0] == {"outcome"} for mid in orders))
    assert sorted(e["order_id"] for e in notified) == sorted(orders.values())
    outcomes = {e["order_id"]: e["outcome"] for e in notified}
    assert outcomes[orders[failed[0]]] == "undeliverable"
    assert {outcomes[orders[m]] for m in delivered} == {"delivered"}
    log = (tmp_path / "second.log").read_text()
    assert "track.check" in log or "track.superseded" in log or "redrive" in log, log[-2000:]
    assert not [line for line in log.splitlines() if line.startswith('{"')], log[-2000:]


@pytest.mark.slow
def test_the_shop_apps_flower_shows_the_tracking_tasks(
    shop: ModuleType, tmp_path: Path, redis_client: redis.Redis, sandbox: SandboxServer
) -> None:
    """``celery -A shop flower`` lists each tracking as a task of the shop's app, with its
    outcome first in the result, and the shop's callback beside it. The worker runs as
    plain ``celery -A shop worker`` (no -E): Flower turns its task events on."""
    pytest.importorskip("flower", reason="Flower is not installed: pip install flower")
    from smsbat_tracker import track_message

    port = free_port()
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 1.0)])
    with (
        _worker(tmp_path, "watched"),
        _celery(tmp_path, "flower", f"--port={port}", "--address=127.0.0.1", log="flower.log"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, auth=LOGIN) as client,
    ):
        replies = wait_for(lambda: shop.app.control.ping(timeout=0.5), timeout=60)
        workers = {name for reply in replies for name in reply}

        def knows() -> bool:
            try:
                response = client.get("/api/workers", params={"status": "true"})
            except httpx.TransportError:
                return False
            return response.status_code == 200 and workers <= set(response.json())

        wait_for(knows, timeout=60, interval=0.2)
        # A worker started without -E sends task events once Flower turns them on.
        log = tmp_path / "watched.log"
        wait_for(lambda: "Events of group {task} enabled" in log.read_text(), timeout=60)
        task_id = track_message.delay(
            mid, deadline=20, on_delivered=shop.mark_notified.s("order-f")
        ).id

        def listed() -> dict[str, Any] | None:
            tasks = client.get("/api/tasks").json()
            mine = tasks.get(task_id, {})
            callbacks = [t for t in tasks.values() if t.get("name") == "shop.mark_notified"]
            done = mine.get("state") == "SUCCESS" and callbacks
            return tasks if done else None

        tasks = wait_for(listed, timeout=40, interval=0.2)
    assert tasks[task_id]["name"] == TRACK_TASK
    assert tasks[task_id]["result"].startswith(f"{{'outcome': 'delivered', 'message_id': '{mid}'")
    assert [e["order_id"] for e in _notified(redis_client)] == ["order-f"]
