"""Tests of the test kit for users' own tests: ``smsbat_tracker.testing`` and its pytest plugin.

Real HTTP against the fake API throughout; the plugin runs in inner pytest sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smsbat_tracker import SmsbatClient
from smsbat_tracker.errors import (
    AuthenticationError,
    MalformedResponse,
    MessageNotFound,
    RateLimited,
    ServerError,
)
from smsbat_tracker.testing import DEFAULT_API_KEY, OUTCOMES, FakeSmsbat
from smsbat_tracker.tools.serving import BackgroundServer
from tests.conftest import wait_for

pytest_plugins = ["pytester"]

PLUGIN = "smsbat_tracker.testing.pytest_plugin"
# Block the installed entry point's name so that the module is registered once, whether or
# not the package's pytest11 entry point is installed.
PLUGIN_ARGS = ("-p", "no:smsbat_tracker", "-p", PLUGIN)
ROOT = Path(__file__).resolve().parent.parent
SENDER = {"from": "MyShop", "to": "+380501234567", "text": "Your code is 1234"}


class PushRecorder:
    """A raw ASGI app recording every JSON body POSTed to it, with its path and query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        target = f"{scope['path']}?{scope['query_string'].decode()}"
        with self._lock:
            self._received.append((target, json.loads(b"".join(chunks))))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def received(self, message_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, body) for t, body in self._received if body["messageId"] == message_id]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeSmsbat]:
    with FakeSmsbat() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeSmsbat) -> FakeSmsbat:
    fake_server.reset()
    return fake_server


@pytest.fixture
def client(fake: FakeSmsbat) -> Iterator[SmsbatClient]:
    with fake.client() as http:
        yield http


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[PushRecorder, str]]:
    recorder = PushRecorder()
    with BackgroundServer(recorder) as running:
        yield recorder, running.url


def observe_until_final(client: SmsbatClient, message_id: str) -> list[tuple[float, str]]:
    """Poll until the status is final: (epoch when each answer had arrived, status)."""
    seen: list[tuple[float, str]] = []

    def final() -> bool:
        status = client.get_status(message_id)
        seen.append((time.time(), status.deliverystatus))
        return status.is_final

    wait_for(final, timeout=10.0, interval=0.05)
    return seen


# ----------------------------------------------------------------------- importing


def test_import_starts_nothing_and_does_not_import_pytest() -> None:
    """Importing the kit (and the plugin module) imports neither pytest nor the sandbox,
    starts no thread, and configures no logging: it is safe in application code."""
    code = (
        "import logging, sys, threading\n"
        "import smsbat_tracker.testing\n"
        "assert 'pytest' not in sys.modules, 'pytest imported'\n"
        "assert 'smsbat_tracker.tools.sandbox' not in sys.modules, 'sandbox imported'\n"
        "assert 'uvicorn' not in sys.modules, 'uvicorn imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert logging.getLogger().handlers == [], 'logging configured'\n"
        "assert logging.getLogger('uvicorn.error').filters == [], 'logger touched'\n"
        "fake = smsbat_tracker.testing.FakeSmsbat()\n"
        "assert not fake.running and threading.active_count() == 1, 'constructing started it'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_public_names_resolve_and_are_sorted() -> None:
    """``__all__`` lists each public name once, in ruff's order, and every one resolves."""
    import smsbat_tracker.testing as kit

    names = list(kit.__all__)
    assert names == sorted(
        names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)
    )
    assert len(set(names)) == len(names)
    assert [n for n in names if not hasattr(kit, n)] == []
    assert {"delivered", "undeliverable", "permanenterror", "never"} == OUTCOMES


def test_pyproject_declares_the_pytest_plugin() -> None:
    """The package registers the plugin with pytest as ``smsbat_tracker`` (pytest11)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project.get("entry-points", {}).get("pytest11", {})
    assert plugins.get("smsbat_tracker") == PLUGIN


# ------------------------------------------------------------------------- lifecycle


def test_not_running_until_started_and_stop_is_idempotent() -> None:
    """A fake serves only between start() and stop(); its URL is unknown before, and
    stopping twice is harmless."""
    fake = FakeSmsbat(api_key="k-1")
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.url
    with pytest.raises(RuntimeError, match="not running"):
        fake.message()
    with fake:
        assert fake.running
        assert fake.url.startswith("http://127.0.0.1:")
        with pytest.raises(RuntimeError, match="already started"):
            fake.start()
    assert not fake.running
    fake.stop()
    assert not fake.running


def test_bad_arguments_are_refused() -> None:
    """Unknown outcomes, a negative delay, a fallback that is not delivered, a bad push URL
    and an empty key are refused with ValueError before anything is created."""
    with pytest.raises(ValueError, match="api_key"):
        FakeSmsbat(api_key="")
    with pytest.raises(ValueError, match="push_url"):
        FakeSmsbat(push_url="ftp://example.com/hook")
    with FakeSmsbat() as fake:
        with pytest.raises(ValueError, match="outcome"):
            fake.message("lost")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="after"):
            fake.message(after=-1)
        with pytest.raises(ValueError, match="fallback"):
            fake.message("undeliverable", fallback=True)
        with pytest.raises(ValueError, match="outcome"):
            fake.set_send_outcome("timeout")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="url"):
            fake.pushes_to("not-a-url")
        with pytest.raises(ValueError, match="at least one"):
            fake.fail_next("abc")
        assert fake.stats()["messages"] == 0


# ---------------------------------------------------------------------- outcomes


@pytest.mark.parametrize("outcome", ["delivered", "undeliverable", "permanenterror"])
def test_scripted_outcome_is_served_at_its_time(
    fake: FakeSmsbat, client: SmsbatClient, outcome: Any
) -> None:
    """message(outcome, after=) is served not final before ``after`` and ``outcome`` from
    then on, through the real client over HTTP."""
    message_id = fake.message(outcome, after=0.4, cost=0.07)
    created = fake.truth(message_id)["created_at"]
    seen = observe_until_final(client, message_id)
    assert seen[-1][1] == outcome
    for answered_at, status in seen:
        if answered_at < created + 0.4:
            assert status in ("scheduled", "processing")
    assert client.get_status(message_id).cost == (0.07 if outcome == "delivered" else 0.0)
    assert fake.truth(message_id)["final_status"] == outcome
    assert fake.polls(message_id) == len(seen) + 1


def test_never_outcome_stays_processing(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """A "never" message is processing and has no final status planned at all."""
    message_id = fake.message("never", after=0)
    status = client.get_status(message_id)
    assert status.deliverystatus == "processing"
    assert not status.is_final
    truth = fake.truth(message_id)
    assert truth["final_status"] is None
    assert [entry[0] for entry in truth["timeline"]] == ["scheduled", "processing"]


def test_chosen_id_and_viber_fallback(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """message_id= picks the id; fallback=True serves the extended body of a Viber message
    delivered by its SMS fallback."""
    message_id = fake.message(message_id="order-42", after=0, fallback=True)
    assert message_id == "order-42"
    status = client.get_status("order-42")
    assert status.is_delivered
    assert status.used_fallback
    assert status.extendedStatuses == {"viber": "undeliverable", "sms": "delivered"}
    with pytest.raises(ValueError, match="already exists"):
        fake.message(message_id="order-42")


def test_scripted_timeline_serves_any_status(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """scripted() serves its timeline verbatim, including statuses the tracker does not know."""
    message_id = fake.scripted([("processing", 0), ("queued-at-operator", 0)])
    assert client.get_status(message_id).deliverystatus == "queued-at-operator"


@pytest.mark.parametrize("outcome", ["undeliverable", "never"])
def test_send_outcome_scripts_sent_messages(
    fake: FakeSmsbat, client: SmsbatClient, outcome: Any
) -> None:
    """set_send_outcome() decides how messages sent through POST /bat/messagelist end, and
    reset() brings back the default: delivered."""
    fake.set_send_outcome(outcome, after=0.2)
    [message_id] = client.send_messages([SENDER]).message_ids
    truth = fake.truth(message_id)
    assert truth["final_status"] == (None if outcome == "never" else outcome)
    if outcome != "never":
        assert truth["final_at"] == pytest.approx(truth["created_at"] + 0.2, abs=1e-3)
        assert observe_until_final(client, message_id)[-1][1] == outcome
    fake.reset()
    [again] = client.send_messages([SENDER]).message_ids
    assert fake.truth(again)["final_status"] == "delivered"


def test_sent_viber_messages_use_the_fallback_when_asked(
    fake: FakeSmsbat, client: SmsbatClient
) -> None:
    """set_send_outcome(fallback=True) delivers sent Viber messages by their SMS fallback."""
    fake.set_send_outcome("delivered", after=0, fallback=True)
    [message_id] = client.send_messages([{**SENDER, "type": "viber_otp"}]).message_ids
    assert observe_until_final(client, message_id)[-1][1] == "delivered"
    status = client.get_status(message_id)
    assert status.used_fallback


# ------------------------------------------------------------------------- faults


def test_faults_apply_inside_the_block_only(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """faults(error_rate=1.0) makes every status request a 500 inside the block; after it,
    the same message is served normally."""
    message_id = fake.message(after=0)
    with fake.faults(error_rate=1.0):
        for _ in range(3):
            with pytest.raises(ServerError):
                client.get_status(message_id)
    assert client.get_status(message_id).is_delivered
    assert fake.stats()["responses"] == {"200": 1, "500": 3}


def test_faults_nest_and_rate_limits_carry_retry_after(
    fake: FakeSmsbat, client: SmsbatClient
) -> None:
    """An inner block's 429s carry its Retry-After; leaving it restores the outer block's
    malformed bodies, and a bad setting changes nothing."""
    message_id = fake.message(after=0)
    with fake.faults(malformed_rate=1.0):
        with fake.faults(malformed_rate=0.0, rate_limit_rate=1.0, retry_after=3):
            with pytest.raises(RateLimited) as limited:
                client.get_status(message_id)
            assert limited.value.retry_after == 3.0
        with pytest.raises(MalformedResponse):
            client.get_status(message_id)
        with pytest.raises(ValueError, match="<= 1"), fake.faults(error_rate=0.5):
            pass  # pragma: no cover - refused on entry
        with pytest.raises(MalformedResponse):
            client.get_status(message_id)
    assert client.get_status(message_id).is_delivered


def test_fail_next_queues_faults_for_one_message(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """fail_next() answers the queued faults in order for that message only, then normally."""
    target = fake.message(after=0)
    other = fake.message(after=0)
    fake.fail_next(target, "500", "429", "401")
    assert client.get_status(other).is_delivered
    with pytest.raises(ServerError):
        client.get_status(target)
    with pytest.raises(RateLimited):
        client.get_status(target)
    with pytest.raises(AuthenticationError):
        client.get_status(target)
    assert client.get_status(target).is_delivered
    assert fake.polls(target) == 4
    assert fake.polls(other) == 1


def test_clear_faults_drops_queued_faults(fake: FakeSmsbat, client: SmsbatClient) -> None:
    """clear_faults() empties fail_next() queues too."""
    message_id = fake.message(after=0)
    fake.fail_next(message_id, "500")
    fake.clear_faults()
    assert client.get_status(message_id).is_delivered


# ------------------------------------------------------------------------- pushes


def test_pushes_arrive_at_the_webhook(fake: FakeSmsbat, receiver: tuple[PushRecorder, str]) -> None:
    """pushes_to(url) POSTs each status change of later messages to url, token and all;
    messages created while pushes are off are never pushed."""
    recorder, url = receiver
    quiet = fake.message(after=0.1)
    fake.pushes_to(f"{url}/webhook?token=t0k")
    message_id = fake.message(after=0.3, cost=0.07)
    wait_for(lambda: len(fake.pushes(message_id)) == 2)
    received = recorder.received(message_id)
    assert [target for target, _ in received] == ["/webhook?token=t0k"] * 2
    bodies = [body for _, body in received]
    assert [b["deliverystatus"] for b in bodies] == ["processing", "delivered"]
    assert bodies[-1]["cost"] == 0.07
    assert bodies[-1]["timestamp"].endswith("Z")
    assert [p["http_status"] for p in fake.pushes(message_id)] == [200, 200]
    assert fake.truth(quiet)["status"] == "delivered"
    assert recorder.received(quiet) == []
    assert fake.pushes(quiet) == []


def test_reset_stops_pushes_and_forgets_everything(
    fake: FakeSmsbat, client: SmsbatClient, receiver: tuple[PushRecorder, str]
) -> None:
    """reset() forgets messages, counters, faults and the push URL."""
    recorder, url = receiver
    fake.pushes_to(f"{url}/webhook")
    message_id = fake.message(message_id="kept-nowhere", after=0)
    fake.fail_next(message_id, "500")
    with fake.faults(error_rate=1.0):
        fake.reset()
        assert fake.stats()["requests"] == 0
        with pytest.raises(MessageNotFound):
            client.get_status("kept-nowhere")
        fresh = fake.message(message_id="kept-nowhere", after=0.2)
        assert client.get_status(fresh).deliverystatus in ("scheduled", "processing", "delivered")
    assert wait_for(lambda: fake.truth(fresh)["status"] == "delivered")
    assert fake.pushes(fresh) == []
    assert recorder.received(fresh) == []


# ------------------------------------------------------------------ configuration


def test_env_and_settings_point_at_the_fake(
    fake: FakeSmsbat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env names the fake's URL and key; settings() builds Settings for it even when the
    environment holds a login; both reach the fake through the project's client."""
    assert fake.env == {"SMSBAT_BASE_URL": fake.url, "SMSBAT_API_KEY": DEFAULT_API_KEY}
    monkeypatch.setenv("SMSBAT_USERNAME", "someone")
    monkeypatch.setenv("SMSBAT_PASSWORD", "secret")
    settings = fake.settings(read_timeout=1.5)
    assert settings.base_url == fake.url
    assert settings.read_timeout == 1.5
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == fake.api_key
    message_id = fake.message(after=0)
    with SmsbatClient.from_settings(settings) as http:
        assert http.get_status(message_id).is_delivered
    with SmsbatClient(fake.url, api_key="wrong") as http, pytest.raises(AuthenticationError):
        http.get_status(message_id)


# -------------------------------------------------------------------- the plugin


INNER_TESTS = """
import os

import pytest

from smsbat_tracker import SmsbatClient, load_settings
from smsbat_tracker.errors import MessageNotFound, ServerError


def test_scripted_outcome(smsbat_api):
    message_id = smsbat_api.message("undeliverable", after=0, message_id="order-1")
    with smsbat_api.client() as client:
        assert client.get_status(message_id).deliverystatus == "undeliverable"
    smsbat_api.pushes_to("http://127.0.0.1:9/never-called")


def test_each_test_starts_empty(smsbat_api):
    assert smsbat_api.stats()["messages"] == 0
    with smsbat_api.client() as client, pytest.raises(MessageNotFound):
        client.get_status("order-1")
    smsbat_api.message(message_id="order-1")
    assert smsbat_api.truth("order-1")["pushes"] == []


def test_env_reaches_the_fake(smsbat_env, smsbat_api):
    assert smsbat_env == smsbat_api.env
    assert "SMSBAT_USERNAME" not in os.environ
    settings = load_settings()
    assert settings.base_url == smsbat_api.url
    smsbat_api.set_send_outcome("permanenterror", after=0)
    with SmsbatClient.from_settings(settings) as client:
        sent = client.send_messages([{"from": "Shop", "to": "+380501234567", "text": "Hi"}])
    assert smsbat_api.truth(sent.message_ids[0])["final_status"] == "permanenterror"


def test_faults(smsbat_api):
    message_id = smsbat_api.message(after=0)
    with smsbat_api.client() as client:
        with smsbat_api.faults(error_rate=1.0), pytest.raises(ServerError):
            client.get_status(message_id)
        assert client.get_status(message_id).is_delivered


def test_one_server_per_session(smsbat_api, smsbat_api_session):
    assert smsbat_api is smsbat_api_session
    assert smsbat_api.running
"""


def test_plugin_fixtures_in_a_pytest_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin's fixtures serve scripted outcomes, faults and the environment, reset the
    fake between tests, and put the environment back after each test."""
    monkeypatch.setenv("SMSBAT_USERNAME", "outer-login")
    before = {name: os.environ.get(name) for name in ("SMSBAT_BASE_URL", "SMSBAT_API_KEY")}
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert {name: os.environ.get(name) for name in before} == before
    assert os.environ["SMSBAT_USERNAME"] == "outer-login"


def test_plugin_lists_its_fixtures(pytester: pytest.Pytester) -> None:
    """``pytest --fixtures`` shows the three smsbat_ fixtures with their docstrings."""
    pytester.makepyfile(test_empty="def test_nothing():\n    pass\n")
    result = pytester.runpytest(*PLUGIN_ARGS, "--fixtures")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "smsbat_api_session* [[]session scope[]]*",
            "*started on first use*",
            "smsbat_api -- *",
            "*empty at the start of the test*",
            "smsbat_env -- *",
            "*Point the environment*",
        ]
    )


def test_plugin_costs_nothing_when_unused(pytester: pytest.Pytester) -> None:
    """A session that loads the plugin but uses none of its fixtures starts no server and
    never imports the sandbox (checked in a fresh process)."""
    pytester.makepyfile(
        test_unused="""
        import sys
        import threading

        PLUGIN = "smsbat_tracker.testing.pytest_plugin"


        def test_nothing_started(request):
            assert request.config.pluginmanager.has_plugin(PLUGIN)
            assert "smsbat_tracker.tools.sandbox" not in sys.modules
            assert not [t for t in threading.enumerate() if t.name.startswith("uvicorn-")]
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
