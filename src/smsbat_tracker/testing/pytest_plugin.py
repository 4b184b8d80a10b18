"""pytest fixtures for testing code that sends through SMSBAT and tracks with smsbat-tracker.

Installed with the package as the pytest plugin ``smsbat_tracker``; without the entry point,
load it with ``-p smsbat_tracker.testing.pytest_plugin`` or ``pytest_plugins =
["smsbat_tracker.testing.pytest_plugin"]`` in a ``conftest.py``. Loading it starts nothing:
the fake API starts the first time a test asks for one of its fixtures.

- ``smsbat_api``: a :class:`~smsbat_tracker.testing.FakeSmsbat`, reset before and after
  each test (no messages, no faults, sends delivered after 1 s, no pushes).
- ``smsbat_env``: sets ``SMSBAT_BASE_URL`` and ``SMSBAT_API_KEY`` to that fake for the test
  (and unsets ``SMSBAT_USERNAME``/``SMSBAT_PASSWORD``); returns the variables it set.
- ``smsbat_api_session``: the one fake shared by the session, as it is (not reset).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smsbat_tracker.testing import FakeSmsbat

__all__ = ["smsbat_api", "smsbat_api_session", "smsbat_env"]


@pytest.fixture(scope="session")
def smsbat_api_session() -> Iterator[FakeSmsbat]:
    """The fake SMSBAT API of the whole session, started on first use; not reset."""
    with FakeSmsbat() as fake:
        yield fake


@pytest.fixture
def smsbat_api(smsbat_api_session: FakeSmsbat) -> Iterator[FakeSmsbat]:
    """The fake SMSBAT API, empty at the start of the test and again after it."""
    smsbat_api_session.reset()
    yield smsbat_api_session
    smsbat_api_session.reset()


@pytest.fixture
def smsbat_env(smsbat_api: FakeSmsbat, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the environment at ``smsbat_api`` for this test; the variables it set."""
    env = smsbat_api.env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A login beside the key is a configuration error: the fake is reached with the key.
    monkeypatch.delenv("SMSBAT_USERNAME", raising=False)
    monkeypatch.delenv("SMSBAT_PASSWORD", raising=False)
    return env
