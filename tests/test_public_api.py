"""Tests of the public surface: what ``smsbat_tracker`` exports and how its errors are built."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import smsbat_tracker
from smsbat_tracker import errors
from smsbat_tracker.errors import PermanentError, SmsbatError, TransientError

EXPECTED_ALL = {
    "FINAL_STATUSES",
    "AsyncSmsbatClient",
    "AuthenticationError",
    "ClientError",
    "ConfigError",
    "ConnectionFailed",
    "InvalidMessageId",
    "MalformedResponse",
    "MessageNotFound",
    "MessageStatus",
    "NotInitialised",
    "OutgoingMessage",
    "PermanentError",
    "RateLimited",
    "RequestTimeout",
    "Schedule",
    "SendResult",
    "SentMessage",
    "ServerError",
    "Settings",
    "SmsbatClient",
    "SmsbatError",
    "Tracker",
    "TransientError",
    "__version__",
    "compute_backoff",
    "get_campaign_report",
    "get_status",
    "init_app",
    "is_delivered",
    "is_final",
    "load_settings",
    "track_campaign",
    "track_message",
    "tracker_of",
    "validate_message_id",
}

MODULES = [
    "smsbat_tracker",
    "smsbat_tracker.rules.schedule",
    "smsbat_tracker.store.cache",
    "smsbat_tracker.provider.client",
    "smsbat_tracker.config",
    "smsbat_tracker.errors",
    "smsbat_tracker.store.keys",
    "smsbat_tracker.log",
    "smsbat_tracker.provider.models",
    "smsbat_tracker.store.ratelimit",
    "smsbat_tracker.celery.integration",
    "smsbat_tracker.celery.names",
    "smsbat_tracker.celery.task_base",
    "smsbat_tracker.celery.track",
    "smsbat_tracker.celery.campaigns",
    "smsbat_tracker.celery.compat.retry",
    "smsbat_tracker.testing",
    "smsbat_tracker.celery.tracker",
]


def _isort_key(name: str) -> tuple[int, str]:
    """Ruff RUF022 order: SCREAMING_CASE, then CamelCase, then the rest, each alphabetical."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_sorted_unique_and_resolves(module_name: str) -> None:
    """Each module's __all__ is sorted (RUF022 isort style), has no duplicates, and resolves."""
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert len(names) == len(set(names))
    assert names == sorted(names, key=_isort_key)
    missing = [name for name in names if not hasattr(module, name)]
    assert missing == []


def test_top_level_all_is_exactly_the_expected_set() -> None:
    """The package exports exactly the documented names; changes are deliberate."""
    assert set(smsbat_tracker.__all__) == EXPECTED_ALL


def test_version_matches_the_installed_distribution() -> None:
    """__version__ agrees with the installed package metadata."""
    assert smsbat_tracker.__version__ == importlib.metadata.version("smsbat-tracker")


def test_top_level_names_are_the_defining_objects() -> None:
    """Re-exports are the very objects of their modules, not copies."""
    assert smsbat_tracker.SmsbatError is errors.SmsbatError
    for name in errors.__all__:
        if name in EXPECTED_ALL:
            assert getattr(smsbat_tracker, name) is getattr(errors, name)


@pytest.mark.parametrize(
    "name",
    list(errors.__all__),
)
def test_every_error_subclasses_smsbat_error_and_says_when_it_is_raised(name: str) -> None:
    """Every exported exception is a SmsbatError whose docstring starts "Raised when"."""
    cls = getattr(errors, name)
    assert isinstance(cls, type)
    assert issubclass(cls, SmsbatError)
    assert (cls.__doc__ or "").startswith("Raised when")


def test_transient_and_permanent_families_are_disjoint() -> None:
    """No exported error is both transient (retried) and permanent (ends tracking)."""
    classes = [getattr(errors, name) for name in errors.__all__]
    assert not [
        c for c in classes if issubclass(c, TransientError) and issubclass(c, PermanentError)
    ]
