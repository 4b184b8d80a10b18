"""The webhook receiver mounted in the project's own ASGI app, for the project's own Celery
app: a Starlette host (what FastAPI's ``app.mount`` is), a plain ASGI host behind a Starlette
``Router``, and Django's ASGI application, served by uvicorn against a real Redis and worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery, _state
from celery.contrib.testing.worker import start_worker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router

import smsbat_tracker.tools.recipes
from smsbat_tracker import init_app
from smsbat_tracker.celery.names import TRACK_TASK
from smsbat_tracker.celery.track import track_message
from smsbat_tracker.celery.tracker import tracker_of
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.session import iso
from smsbat_tracker.errors import NotInitialised
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.serving import BackgroundServer, Receive, Scope, Send
from smsbat_tracker.webhook import WebhookReceiver, create_app
from tests.conftest import FAST, kept, recorded, wait_for

TOKEN = "mount-token-123"
PREFIX = "/smsbat"
RECORD_SIG = smsbat_tracker.tools.recipes.record_outcome
RECORD = RECORD_SIG.name
# The first check comes 1 s after the enqueue and the next one 3 s later: an outcome within
# a few hundred milliseconds of a push can only come from the push.
SLOW_CHECKS = {"first_delay": 1.0, "backoff_factor": 3.0, "max_delay": 3.0}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The package app's settings (``tracker_app``), with the webhook token."""
    return make_settings(webhook_token=TOKEN, **SLOW_CHECKS)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An HTTP client, closed after the test."""
    with httpx.Client(timeout=10.0) as client:
        yield client


def delivered(message_id: str) -> dict[str, Any]:
    """A final push for ``message_id``, as the provider sends it."""
    return {"messageId": message_id, "deliverystatus": "delivered", "timestamp": iso(time.time())}


async def home(_request: Request) -> Response:
    return PlainTextResponse("host")


def starlette_host(
    webhook: Starlette, events: list[str], *, enter_receiver: bool = False
) -> Starlette:
    """The project's app: routes of its own, the webhook mounted at PREFIX, its own lifespan
    (which enters the receiver's when ``enter_receiver``)."""

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        if enter_receiver:
            async with webhook.state.receiver.lifespan():
                yield
        else:
            yield
        events.append("shutdown")

    return Starlette(routes=[Route("/", home), Mount(PREFIX, app=webhook)], lifespan=lifespan)


# --------------------------------------------------------------------- Starlette / FastAPI


@pytest.mark.parametrize("built_with", ["celery_app", "settings"])
def test_a_push_to_the_mounted_webhook_ends_the_tracking(
    built_with: str,
    http: httpx.Client,
    settings: Settings,
    tracker_app: Any,
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """Mounted at /smsbat in a host with a lifespan of its own (the webhook's does not run),
    the receiver connects on its first request; a push to /smsbat/webhook is stored and ends
    the tracking at once: the callback runs, with no poll. Built for the Celery app, or
    standalone from settings (the package's app), alike."""
    webhook = (
        create_app(celery_app=tracker_app) if built_with == "celery_app" else create_app(settings)
    )
    receiver: WebhookReceiver = webhook.state.receiver
    assert receiver.settings is tracker_app.settings
    events: list[str] = []
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    track_message.delay(mid, on_delivered=RECORD_SIG.s(label="mnt"))
    with BackgroundServer(starlette_host(webhook, events), lifespan="on") as server:
        assert events == ["startup"]
        assert not receiver.warmed  # the mounted app's lifespan never ran
        assert http.get(f"{server.url}/").text == "host"
        pushed_at = time.time()
        answer = http.post(
            f"{server.url}{PREFIX}/webhook", params={"token": TOKEN}, json=delivered(mid)
        )
        assert answer.status_code == 200
        assert answer.json() == {"status": "stored", "final": True}
        assert receiver.warmed
        [entry] = wait_for(lambda: recorded(redis_client, "mnt"))
    assert events == ["startup", "shutdown"]
    assert entry["recorded_at"] - pushed_at < settings.first_delay
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["source"] == "push"
    assert entry["result"]["polls"] == 0
    assert sandbox.state.truth(mid)["polls"] == 0


def test_the_mounted_routes_answer_under_the_prefix_only(
    http: httpx.Client, settings: Settings, tracker_app: Any, redis_client: redis.Redis
) -> None:
    """Mounted at /smsbat, /smsbat/healthz, /smsbat/metrics and /smsbat/openapi.json answer
    (the document naming /smsbat as its server); the unprefixed paths are the host's (404),
    and a wrong token on the mounted webhook is still refused and stores nothing."""
    settled: list[str] = []
    webhook = create_app(celery_app=tracker_app, settle=settled.append)
    with BackgroundServer(starlette_host(webhook, [])) as server:
        health = http.get(f"{server.url}{PREFIX}/healthz")
        scrape = http.get(f"{server.url}{PREFIX}/metrics")
        document = http.get(f"{server.url}{PREFIX}/openapi.json")
        unprefixed = http.post(
            f"{server.url}/webhook", params={"token": TOKEN}, json=delivered("u1")
        )
        wrong = http.post(
            f"{server.url}{PREFIX}/webhook", params={"token": "wrong"}, json=delivered("u2")
        )
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert scrape.status_code == 200
    assert "smsbat_webhook_pushes" in scrape.text
    assert document.json()["servers"] == [{"url": PREFIX}]
    assert "/webhook" in document.json()["paths"]
    assert unprefixed.status_code == 404
    assert wrong.status_code == 401
    assert settled == []
    assert not list(redis_client.scan_iter("smsbat:status:*"))


def test_the_hosts_lifespan_warms_and_closes_the_receiver(
    http: httpx.Client,
    make_settings: Callable[..., Settings],
    tracker_app: Any,
    redis_client: redis.Redis,
) -> None:
    """Entered in the host's own lifespan, ``receiver.lifespan()`` connects before the
    first request and closes the receiver's own connections at shutdown."""
    own = make_settings(webhook_token=TOKEN)  # not the tracker's: the receiver's own engine
    settled: list[str] = []
    webhook = create_app(own, celery_app=tracker_app, settle=settled.append)
    receiver: WebhookReceiver = webhook.state.receiver
    events: list[str] = []
    with BackgroundServer(
        starlette_host(webhook, events, enter_receiver=True), lifespan="on"
    ) as server:
        assert receiver.warmed
        engine = receiver._own_engine
        assert engine is not None
        assert engine.app is tracker_app  # callbacks go out through the given app
        answer = http.post(
            f"{server.url}{PREFIX}/webhook", params={"token": TOKEN}, json=delivered("hl1")
        )
        assert answer.json() == {"status": "stored", "final": True}
        assert receiver._own_engine is engine  # the first request built nothing new
    assert events == ["startup", "shutdown"]
    assert settled == ["hl1"]
    assert receiver._own_engine is None
    assert not receiver.warmed


# --------------------------------------------------------------------- the project's Celery app


@pytest.fixture
def shop_overrides(sandbox: SandboxServer) -> dict[str, Any]:
    """The shop's tracker settings (``init_app`` overrides): its own key prefix."""
    return {
        **FAST,
        **SLOW_CHECKS,
        "base_url": sandbox.url,
        "api_key": "sandbox-key",
        "webhook_token": TOKEN,
        "key_prefix": "shop",
    }


@pytest.fixture
def shop_app(
    redis_url: str,
    redis_client: redis.Redis,
    sandbox: SandboxServer,
    shop_overrides: dict[str, Any],
) -> Iterator[Celery]:
    """The project's own ``Celery("shop")`` on the test Redis, its tasks on queue "shop",
    after ``init_app``; the current and default apps are given back afterwards."""
    sandbox.state.reset()
    previous = _state.get_current_app()
    default = _state.default_app  # type: ignore[attr-defined]
    app = Celery("shop", broker=redis_url)
    app.conf.task_default_queue = "shop"
    init_app(app, **shop_overrides)
    try:
        yield app
    finally:
        tracker_of(app).close()
        app.close()
        _state.set_default_app(default)
        previous.set_current()


@pytest.fixture
def shop_worker(shop_app: Celery) -> Iterator[Any]:
    """A worker of the shop app only: it consumes queue "shop", never the package's."""
    with start_worker(
        shop_app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10.0,
    ) as running:
        yield running


def test_a_receiver_for_the_shop_app_settles_through_it(
    http: httpx.Client,
    shop_app: Celery,
    shop_worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """Built with ``celery_app=shop_app``, the receiver takes the shop tracker's settings
    and engine; a push stores under the shop's key prefix and ends the shop's tracking, and
    the callback goes out through the shop app, to the shop's worker, with no poll. The
    package's keys and queue stay empty."""
    tracker = tracker_of(shop_app)
    webhook = create_app(celery_app=shop_app)
    receiver: WebhookReceiver = webhook.state.receiver
    assert receiver.settings is tracker.settings
    assert receiver.celery_app is shop_app
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    shop_app.tasks[TRACK_TASK].delay(
        mid, on_delivered=shop_app.signature(RECORD, kwargs={"label": "shop"})
    )
    with BackgroundServer(starlette_host(webhook, [])) as server:
        pushed_at = time.time()
        answer = http.post(
            f"{server.url}{PREFIX}/webhook", params={"token": TOKEN}, json=delivered(mid)
        )
        assert answer.json() == {"status": "stored", "final": True}
        [entry] = wait_for(lambda: recorded(redis_client, "shop", prefix="shop"))
    assert receiver.engine() is tracker.engine  # one set of connections per process
    assert entry["recorded_at"] - pushed_at < tracker.settings.first_delay
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["source"] == "push"
    assert entry["result"]["polls"] == 0
    assert "outcome" in kept(redis_client, mid, prefix="shop")[0]
    assert not list(redis_client.scan_iter("smsbat:*"))
    assert redis_client.llen("celery") == 0


def test_a_celery_app_without_the_tracker_is_refused(redis_url: str) -> None:
    """A Celery app that never called init_app is refused when the receiver is built,
    naming the call to make."""
    plain = Celery("plain", broker=redis_url, set_as_current=False)
    try:
        with pytest.raises(NotInitialised, match=r"Celery app 'plain'.*init_app"):
            create_app(celery_app=plain)
    finally:
        plain.close()


def test_a_receiver_for_a_project_app_never_builds_the_package_app(tmp_path: Path) -> None:
    """Given the project's Celery app, building and serving the receiver imports nothing of
    the package's own app (which is built from the environment on import)."""
    probe = textwrap.dedent(
        """
        import sys

        import httpx
        from celery import Celery

        import smsbat_tracker
        from smsbat_tracker.tools.serving import BackgroundServer
        from smsbat_tracker.celery.tracker import tracker_of
        from smsbat_tracker.webhook import create_app

        app = Celery("shop", broker="redis://127.0.0.1:1/0")
        smsbat_tracker.init_app(app, webhook_token="t")
        webhook = create_app(celery_app=app, settle=lambda _mid: None)
        with BackgroundServer(webhook) as server:
            answer = httpx.get(f"{server.url}/openapi.json", timeout=10)
        assert answer.status_code == 200, answer.status_code
        assert webhook.state.receiver.settings is tracker_of(app).settings
        print("smsbat_tracker.worker" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBAT_")}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------- other ASGI hosts


class OtherApp:
    """An ASGI app that, like Django's, serves HTTP and refuses the lifespan protocol."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"only HTTP connections, not {scope['type']}")
        self.paths.append(scope["path"])
        await PlainTextResponse("other")(scope, receive, send)


def test_a_router_sends_the_prefix_to_the_receiver_and_the_rest_to_the_host(
    http: httpx.Client, settings: Settings, tracker_app: Any, redis_client: redis.Redis
) -> None:
    """``Router([Mount(prefix, webhook), Mount("/", other)], lifespan=receiver.lifespan)``
    (the asgi.py recipe): prefixed paths reach the receiver, connected at start-up and
    closed at shutdown; every other path reaches the host app, which never sees the
    lifespan protocol it refuses."""
    own = settings.model_copy()  # not the tracker's: the receiver's own engine
    settled: list[str] = []
    webhook = create_app(own, celery_app=tracker_app, settle=settled.append)
    receiver: WebhookReceiver = webhook.state.receiver
    other = OtherApp()
    application = Router(
        [Mount(PREFIX, app=webhook), Mount("/", app=other)], lifespan=receiver.lifespan
    )
    with BackgroundServer(application, lifespan="on") as server:
        assert receiver._own_engine is not None
        answer = http.post(
            f"{server.url}{PREFIX}/webhook", params={"token": TOKEN}, json=delivered("r1")
        )
        page = http.get(f"{server.url}/orders/7")
        root = http.get(f"{server.url}/")
    assert answer.json() == {"status": "stored", "final": True}
    assert settled == ["r1"]
    assert (page.text, root.text) == ("other", "other")
    assert other.paths == ["/orders/7", "/"]
    assert receiver._own_engine is None


DJANGO_SETTINGS = """
SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "site_urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
USE_TZ = True
"""

DJANGO_URLS = """
from django.http import HttpResponse
from django.urls import path

urlpatterns = [path("orders/<int:pk>", lambda request, pk: HttpResponse(f"order {pk}"))]
"""

# The project's Celery app, as the web process imports it (settings from SMSBAT_*).
DJANGO_CELERY = """
import os

from celery import Celery

import smsbat_tracker

app = Celery("shop", broker=os.environ["REDIS_URL"])
app.conf.task_default_queue = "shop"
smsbat_tracker.init_app(app)
"""

# What the README shows for asgi.py.
DJANGO_ASGI = """
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
django_app = get_asgi_application()  # sets Django up before anything imports models

from starlette.routing import Mount, Router

from site_celery import app as celery_app
from smsbat_tracker.webhook import create_app

webhook = create_app(celery_app=celery_app)
application = Router(
    [Mount("/smsbat", app=webhook), Mount("/", app=django_app)],
    lifespan=webhook.state.receiver.lifespan,
)
"""

# Serves asgi.py's application until stdin closes.
DJANGO_SERVE = """
import sys

from site_asgi import application
from smsbat_tracker.tools.serving import BackgroundServer

with BackgroundServer(application, lifespan="on") as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def test_django_asgi_routes_the_prefix_to_the_receiver(
    tmp_path: Path,
    http: httpx.Client,
    redis_url: str,
    shop_app: Celery,
    shop_worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
) -> None:
    """A Django web process serving the asgi.py recipe: /smsbat/webhook reaches the receiver,
    built for the project's Celery app, whose settle sends the callback to the project's
    worker; every other path is Django's."""
    pytest.importorskip("django", reason="Django is a development dependency")
    files = {
        "site_settings.py": DJANGO_SETTINGS,
        "site_urls.py": DJANGO_URLS,
        "site_celery.py": DJANGO_CELERY,
        "site_asgi.py": DJANGO_ASGI,
        "serve.py": DJANGO_SERVE,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBAT_")}
    env.update(tracker_of(shop_app).settings.to_env())
    env.update({"REDIS_URL": redis_url, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 60)])
    with subprocess.Popen(
        [sys.executable, "serve.py"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as web:
        assert web.stdout is not None
        try:
            url = web.stdout.readline().strip()
            assert url.startswith("http://"), web.stderr.read() if web.stderr else ""
            # Tracked once the web process is up: the first check is a second away.
            shop_app.tasks[TRACK_TASK].delay(
                mid, on_delivered=shop_app.signature(RECORD, kwargs={"label": "django"})
            )
            answer = http.post(
                f"{url}/smsbat/webhook", params={"token": TOKEN}, json=delivered(mid)
            )
            health = http.get(f"{url}/smsbat/healthz")
            page = http.get(f"{url}/orders/7")
            missing = http.get(f"{url}/webhook")
        finally:
            _, errors = web.communicate(timeout=30)  # closes stdin: the server stops
    assert web.returncode == 0, errors
    assert answer.json() == {"status": "stored", "final": True}
    assert health.json() == {"status": "ok"}
    assert (page.status_code, page.text) == (200, "order 7")
    assert missing.status_code == 404
    [entry] = wait_for(lambda: recorded(redis_client, "django", prefix="shop"))
    assert entry["result"]["outcome"] == "delivered"
    assert entry["result"]["source"] == "push"
    assert entry["result"]["polls"] == 0
