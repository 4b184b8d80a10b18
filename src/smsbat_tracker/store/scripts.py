"""The Lua scripts: read from the package's ``.lua`` files, their includes resolved, once.

Each script is a file in ``lua/``; shared functions live in ``lua/lib/`` and are pulled in
by a line ``--! include lib/<name>.lua`` (the file's text replaces the line; an include
is expanded once per script). A script opens with a named local for every ``KEYS`` and
``ARGV`` entry, so its offsets are read in one place; the typed wrapper of each script
(a :class:`Script` subclass beside the code that runs it) is the only Python that knows
them. No Lua is written by Python.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, ClassVar

import redis
from redis.commands.core import Script as RedisScript

__all__ = ["Script", "source"]

_INCLUDE = re.compile(r"^--! include (\S+\.lua)[ \t]*$", re.MULTILINE)


def _read(name: str) -> str:
    return (resources.files("smsbat_tracker.store") / "lua" / name).read_text(encoding="utf-8")


@functools.cache
def source(name: str) -> str:
    """The text of ``lua/<name>`` with its includes expanded (each library at most once)."""
    seen: set[str] = set()

    def expand(text: str, stack: tuple[str, ...]) -> str:
        def include(match: re.Match[str]) -> str:
            lib = match.group(1)
            if lib in stack:
                raise ValueError(f"lua/{name}: include cycle through {lib}")
            if lib in seen:
                return f"-- (included above: {lib})"
            seen.add(lib)
            return expand(_read(lib), (*stack, lib)).rstrip("\n")

        return _INCLUDE.sub(include, text)

    return expand(_read(name), (name,))


class Script:
    """One ``.lua`` file registered on a client (EVALSHA, loaded again after NOSCRIPT).

    Subclasses name their ``file`` and give a typed ``__call__`` that lays out KEYS and
    ARGV in the order the file's locals name them.
    """

    file: ClassVar[str]

    def __init__(self, client: redis.Redis) -> None:
        self._script: RedisScript = client.register_script(source(self.file))

    @property
    def sha(self) -> str:
        """The script's SHA1, as EVALSHA names it on the wire."""
        return str(self._script.sha)

    def run(
        self,
        keys: Sequence[str],
        args: Sequence[Any],
        client: redis.Redis | redis.client.Pipeline | None = None,
    ) -> Any:
        """Run the script (on ``client``, a pipeline for instance, when given)."""
        return self._script(keys=list(keys), args=list(args), client=client)
