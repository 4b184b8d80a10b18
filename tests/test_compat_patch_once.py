"""The helper every single-attribute patch installs through (``compat.patch_once``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smsbat_tracker.celery.compat import patch_once, patched


class Upstream:
    def greet(self) -> str:
        return "hello"


def _loud(original: Callable[[Any], str]) -> Callable[[Any], str]:
    def greet(self: Any) -> str:
        return original(self).upper()

    return greet


def test_patch_once_wraps_once_and_marks_the_wrapper() -> None:
    """The first call wraps and marks the attribute; a second finds the mark and leaves
    it (a patch installed twice would wrap its own wrapper); another mark patches anew."""

    class Owner(Upstream):
        pass

    assert not patched(Owner, "greet", "_test_mark")
    assert patch_once(Owner, "greet", _loud, "_test_mark") is True
    wrapped = Owner.greet
    assert Owner().greet() == "HELLO"
    assert patched(Owner, "greet", "_test_mark")
    assert patch_once(Owner, "greet", _loud, "_test_mark") is False
    assert Owner.greet is wrapped
    assert Owner().greet() == "HELLO"
    assert not patched(Upstream, "greet", "_test_mark")  # the class it came from is untouched
    assert not patched(Owner, "missing", "_test_mark")
