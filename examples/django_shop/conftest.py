"""End-to-end fixtures for the example shop.

Everything is real except SMSBAT: Redis (``REDIS_URL``, else an embedded server), the
shop's SQLite file, an SMTP server (aiosmtpd), and one ``celery -A shop worker``
subprocess that runs the tracker's tasks and the shop's callbacks. SMSBAT is the fake
API of smsbat-tracker's test kit (``smsbat_api``), with scripted outcomes.

The test process is set up in :func:`pytest_configure`, before any test module imports the
shop: Django reads its settings, and the tracker its SMSBAT_* settings, at import.
"""

import contextlib
import email
import email.policy
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest

from smsbat_tracker.testing import FakeSmsbat
from smsbat_tracker.tools.workers import stop_process_group

EXAMPLE_DIR = Path(__file__).resolve().parent

# The schedules the tests run with, in the test process and the worker alike.
TEST_ENV = {
    "DJANGO_SETTINGS_MODULE": "shop.settings",
    # Tracking: first check 0.2 s after the send, then at most 1 s apart.
    "SMSBAT_FIRST_DELAY": "0.2",
    "SMSBAT_MAX_DELAY": "1",
    "SMSBAT_JITTER": "0",
    "SMSBAT_DEADLINE": "20",
    # The shop: a failed confirmation is sent again after 1 s, twice in all; a login code's
    # SMS has 2 s to arrive before the code goes out by e-mail.
    "SHOP_CONFIRMATION_RETRY_DELAY": "1",
    "SHOP_CONFIRMATION_ATTEMPTS": "2",
    "SHOP_LOGIN_CODE_SMS_DEADLINE": "2",
}

_STACK = pytest.StashKey[contextlib.ExitStack]()
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    """Redis, a fresh SQLite file and Django for the test process; the test kit's fixtures."""
    if not config.pluginmanager.hasplugin("smsbat_tracker"):
        # Installed packages load it through their entry point; an older install does not.
        config.pluginmanager.import_plugin("smsbat_tracker.testing.pytest_plugin")
    import django
    import redis
    from django.core.management import call_command

    from smsbat_tracker.tools.embedded import redis_url_or_embedded

    stack = config.stash[_STACK] = contextlib.ExitStack()
    redis_url = stack.enter_context(redis_url_or_embedded())
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()  # as in the main suite: the tests' Redis is theirs alone
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="django-shop-"))
    # Never a real SMSBAT account: each test points SMSBAT_* at the fake.
    for name in ("SMSBAT_API_KEY", "SMSBAT_USERNAME", "SMSBAT_PASSWORD", "SMSBAT_BASE_URL"):
        os.environ.pop(name, None)
    os.environ.update(
        TEST_ENV, REDIS_URL=redis_url, SHOP_DATABASE=os.path.join(workdir, "shop.sqlite3")
    )
    django.setup()
    call_command("migrate", verbosity=0)


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_STACK, None)
    if stack is not None:
        stack.close()


class Mailbox:
    """What an SMTP server (aiosmtpd, on a free port) received, as parsed messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self._messages.append(message)
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        """The messages received for ``address``."""
        with self._lock:
            return [m for m in self._messages if m["To"] == address]

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server on 127.0.0.1; its mailbox and port."""
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=_free_port())
    controller.start()
    yield mailbox, controller.port
    controller.stop()


class Worker:
    """The ``celery -A shop worker`` subprocess, and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture(scope="session")
def shop_worker(
    smsbat_api_session: FakeSmsbat,
    smtp_server: tuple[Mailbox, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    """One real worker for the session: the tracker's tasks and the shop's callbacks, a
    thread pool, the fake SMSBAT API, the SMTP server and the shop's SQLite file."""
    from shop.celery import app

    _, smtp_port = smtp_server
    env = {
        **os.environ,
        **smsbat_api_session.env,
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(smtp_port),
    }
    hostname = f"shop-test-{uuid.uuid4().hex[:8]}@%h"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [
        *(sys.executable, "-m", "celery", "-A", "shop", "worker"),
        *("--pool", "threads", "-c", "4", "--without-gossip", "--without-mingle"),
        *("--loglevel", "INFO", "--hostname", hostname),
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            command,
            cwd=EXAMPLE_DIR,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(proc, log_path)
    try:
        give_up = time.monotonic() + 30
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > give_up:
                pytest.fail(f"the worker did not start:\n{worker.tail()}")
        yield worker
    finally:
        stop_process_group(proc)


@pytest.fixture
def mailbox(smtp_server: tuple[Mailbox, int]) -> Mailbox:
    """The SMTP server's mailbox, emptied for the test."""
    box, _ = smtp_server
    box.clear()
    return box


@pytest.fixture(autouse=True)
def shop(shop_worker: Worker, smsbat_api: FakeSmsbat, smsbat_env: dict[str, str]) -> Worker:
    """Every test: the worker running, the fake SMSBAT API reset (sends end delivered after
    1 s) and the test process pointed at it."""
    return shop_worker


@pytest.fixture
def eventually(shop_worker: Worker) -> Callable[..., Any]:
    """``eventually(predicate, what=...)``: poll until ``predicate()`` is truthy and return
    it; fail after ``timeout`` seconds, with the worker's last log lines."""

    def wait(predicate: Callable[[], T], *, what: str, timeout: float = 20.0) -> T:
        give_up = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > give_up:
                pytest.fail(
                    f"{what}: not within {timeout} s; the worker's log ends:\n{shop_worker.tail()}"
                )
            time.sleep(0.05)

    return wait


@pytest.fixture
def phone() -> str:
    """A phone number of this test's own."""
    return f"+38050{uuid.uuid4().int % 10**7:07d}"
