"""Every patch of Celery, kombu and billiard internals, in one place, installed by the
worker's bootstep (never at import), each checked against the versions it was made for.

Each patch module names the upstream package and the versions it was made for
(``PACKAGE``, ``LOWEST``, ``BELOW``), and its ``install()`` checks the one running with
:func:`require` before it touches anything: on a version it does not know the
worker stops at start with :class:`~smsbat_tracker.errors.UnsupportedVersion`, rather than
run with a patch that no longer fits. Each has a test that fails when upstream changes
what it relies on (tests/test_compat*.py).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from smsbat_tracker.errors import UnsupportedVersion

__all__ = ["patch_once", "patched", "require", "version_tuple"]


def version_tuple(version: str) -> tuple[int, ...]:
    """``"5.7.0rc1"`` -> ``(5, 7, 0)``: the leading numbers of each dotted part."""
    parts: list[int] = []
    for part in version.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(parts)


def require(package: str, lowest: str, below: str) -> str:
    """The installed version of ``package``; raises :class:`UnsupportedVersion` unless
    ``lowest <= version < below``."""
    version = metadata.version(package)
    if not version_tuple(lowest) <= version_tuple(version) < version_tuple(below):
        raise UnsupportedVersion(package, version, f">={lowest},<{below}")
    return version


def patched(owner: Any, name: str, mark: str) -> bool:
    """Whether ``owner.<name>`` carries the patch marked ``mark``."""
    return bool(getattr(getattr(owner, name, None), mark, False))


def patch_once(owner: Any, name: str, wrap: Callable[[Any], Any], mark: str) -> bool:
    """Replace ``owner.<name>`` with ``wrap(owner.<name>)``, marked ``mark``, unless it is
    marked already (a second install, or the same patch imported twice); True when it
    patched."""
    if patched(owner, name, mark):
        return False
    wrapped = wrap(getattr(owner, name))
    setattr(wrapped, mark, True)
    setattr(owner, name, wrapped)
    return True
