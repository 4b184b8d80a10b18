"""Tests of the Retry patch (smsbat_tracker.celery.compat.retry): what it relies on in
Celery's ``Retry``, what it changes, and the versions it refuses."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry

from smsbat_tracker.celery import compat
from smsbat_tracker.celery.compat import retry as patch
from smsbat_tracker.celery.task_base import NextRun, rerun
from smsbat_tracker.errors import UnsupportedVersion


@pytest.fixture
def checked_again() -> Iterator[None]:
    """Forget the process's version check before and after the test."""
    patch.install.cache_clear()
    yield
    patch.install.cache_clear()


def test_upstream_retry_shows_its_arguments_not_its_reason() -> None:
    """Celery's Retry still reprs as ``Retry(Retry(...), reason, when)``: the repr the patch
    replaces (when upstream shows the reason itself, drop the patch)."""
    retry = Retry(exc=NextRun("processing; next check in 8.0 s"), when=8.0)
    assert Retry.__repr__ is BaseException.__repr__
    assert repr(retry) == "Retry(Retry(...), NextRun('processing; next check in 8.0 s'), 8.0)"


def test_upstream_retry_keeps_its_reason_and_when_in_attributes() -> None:
    """The patch reads ``exc``: Retry keeps the reason there (the very object), and its
    ``str``/``humanize`` (which the patch leaves alone) read ``when`` and the reason."""
    reason = NextRun("the request failed; retry in 1.0 s")
    retry = Retry(exc=reason, when=1.0)
    assert retry.exc is reason
    assert retry.when == 1.0
    assert retry.humanize() == "in 1.0s"
    assert str(retry) == "Retry in 1.0s: NextRun('the request failed; retry in 1.0 s')"
    assert Retry(when=1.0).exc is None


def test_task_retry_returns_a_plain_retry_carrying_the_reason() -> None:
    """``Task.retry(throw=False, exc=..., countdown=...)`` returns a Retry (the class the
    patch swaps from), with the reason in ``exc`` and the countdown in ``when``."""
    app = Celery("compat-retry", set_as_current=False)
    seen: list[Retry] = []

    @app.task(bind=True, name="tests.compat_retry")
    def retries(self: Any) -> None:
        seen.append(self.retry(throw=False, countdown=8.0, exc=NextRun("x")))

    retries.apply()
    [retry] = seen
    assert type(retry) is Retry
    assert repr(retry.exc) == "NextRun('x')"
    assert retry.when == 8.0


def test_a_swapped_retry_shows_its_reason_and_stays_a_retry() -> None:
    """After the swap the repr is the reason's, everything else is Celery's: still a Retry,
    same ``str``, and it pickles back (Retry's ``__reduce__`` names ``self.__class__``)
    as the shown class with its reason and when, as a prefork child sends it."""
    assert "__slots__" not in vars(Retry)  # a class swap needs the same instance layout
    assert set(vars(patch.ShownRetry)) <= {"__module__", "__qualname__", "__doc__", "__repr__"}
    retry = patch.shown_as_reason(Retry(exc=NextRun("processing; next check in 8.0 s"), when=8.0))
    assert type(retry) is patch.ShownRetry
    assert isinstance(retry, Retry)
    assert repr(retry) == "NextRun('processing; next check in 8.0 s')"
    assert str(retry) == "Retry in 8.0s: NextRun('processing; next check in 8.0 s')"
    copy = pickle.loads(pickle.dumps(retry))
    assert type(copy) is patch.ShownRetry
    assert repr(copy) == repr(retry)
    assert copy.when == 8.0
    # A retry without a reason keeps Celery's repr; Celery's own class is untouched.
    assert repr(patch.shown_as_reason(Retry(when=2.0))) == "ShownRetry(ShownRetry(...), None, 2.0)"
    assert Retry.__repr__ is BaseException.__repr__


def test_the_running_celery_is_in_the_known_range(checked_again: None) -> None:
    """The installed Celery is one the patch knows: ``install`` returns its version."""
    assert compat.version_tuple(patch.install()) >= compat.version_tuple(patch.LOWEST)
    assert patch.PACKAGE == "celery"


@pytest.mark.parametrize("version", ["5.3.6", "5.8.0", "6.0.0"])
def test_an_unknown_celery_is_refused(
    version: str, monkeypatch: pytest.MonkeyPatch, checked_again: None
) -> None:
    """On a Celery outside LOWEST..BELOW, ``install`` raises UnsupportedVersion, and a
    tracker task's retry stops before the next run is published."""
    monkeypatch.setattr(compat.metadata, "version", lambda package: version)
    with pytest.raises(UnsupportedVersion) as caught:
        patch.install()
    assert caught.value.package == "celery"
    assert caught.value.version == version
    assert caught.value.supported == f">={patch.LOWEST},<{patch.BELOW}"

    class Published(Exception):
        """Raised by the fake task's retry: the next run would have been published."""

    class FakeTask:
        def retry(self, **options: Any) -> Retry:
            raise Published

    with pytest.raises(UnsupportedVersion):
        rerun(FakeTask(), countdown=1.0, exc=NextRun("x"))  # type: ignore[arg-type]
