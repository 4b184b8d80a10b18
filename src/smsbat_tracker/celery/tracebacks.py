"""Lean copies of the tracebacks Celery keeps of each retry.

A check that waits for the next one raises Celery's ``Retry``. For each, Celery builds a
billiard ``ExceptionInfo``, which copies the traceback frame by frame so that it can be
pickled (a prefork child sends it to the pool's parent). On Python 3.11 each frame's copy
holds the code positions of *every* instruction of the frame's function: Celery's own
``trace_task``, the frame that catches every task's exception, has 2,341, about 190 KB of
tuples per retry, made, pickled, sent and dropped again. A worker's children spend CPU on
it, and the garbage comes in bursts that raise their memory's high-water mark.

:func:`lean_copies` makes each copy keep only what a formatter reads: the position of the
frame's own instruction (``tb_lasti``), the others blank. A traceback formatted from the
copy reads exactly as one formatted from the original. Applied when the worker module is
imported; a billiard that copies differently is left alone.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["lean_copies"]

Position = tuple[int | None, int | None, int | None, int | None]
_BLANK: Final[Position] = (None, None, None, None)


class Positions:
    """One copied frame's code positions: its own instruction's, the rest blank."""

    __slots__ = ("at", "position", "size")

    def __init__(self, at: int, position: Position, size: int) -> None:
        self.at = at
        self.position = position
        self.size = size

    def __iter__(self) -> Iterator[Position]:
        return itertools.chain(
            itertools.repeat(_BLANK, self.at),
            (self.position,),
            itertools.repeat(_BLANK, max(0, self.size - self.at - 1)),
        )

    def __reduce__(self) -> tuple[type[Positions], tuple[int, Position, int]]:
        return Positions, (self.at, self.position, self.size)


class _WithoutPositions:
    """A code object as billiard's copy reads it, minus the list of every position."""

    def __init__(self, code: Any) -> None:
        self._code = code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._code, name)

    @staticmethod
    def co_positions() -> Iterator[Position]:
        return iter(())


def lean_copies() -> bool:
    """Make billiard's traceback copies keep one position per frame; True when applied."""
    try:
        from billiard import einfo
    except ImportError:  # pragma: no cover - a dependency of Celery
        return False
    code_cls, traceback_cls = getattr(einfo, "_Code", None), getattr(einfo, "Traceback", None)
    if sys.version_info < (3, 11) or code_cls is None or traceback_cls is None:
        return False  # pragma: no cover - nothing to trim
    if getattr(traceback_cls, "_smsbat_lean", False):
        return True
    if not isinstance(code_cls.__dict__.get("co_positions"), property):
        return False  # pragma: no cover - not the copy this module knows
    copy_code = code_cls.__init__
    copy_traceback = traceback_cls.__init__

    def code_init(self: Any, code: Any) -> None:
        copy_code(self, _WithoutPositions(code))

    def traceback_init(self: Any, tb: Any, *args: Any, **kwargs: Any) -> None:
        copy_traceback(self, tb, *args, **kwargs)
        code, lasti = tb.tb_frame.f_code, tb.tb_lasti
        size = len(code.co_code) // 2
        at = min(max(0, lasti // 2), max(0, size - 1))
        position = next(itertools.islice(code.co_positions(), at, None), _BLANK)
        copied = getattr(self.tb_frame, "f_code", None)
        if isinstance(copied, code_cls):
            copied._co_positions = Positions(at, position, size)

    code_cls.__init__ = code_init
    traceback_cls.__init__ = traceback_init
    traceback_cls._smsbat_lean = True
    return True
