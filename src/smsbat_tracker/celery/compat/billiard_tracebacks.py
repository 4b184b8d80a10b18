"""billiard's traceback copies trimmed to what a formatter reads: ~190 KB less per retry.

What upstream does: a check that waits for the next one raises Celery's ``Retry``. For
each, Celery builds a billiard ``ExceptionInfo``, which copies the traceback frame by
frame so that it can be pickled (a prefork child sends it to the pool's parent). On
Python 3.11 each frame's copy (``einfo._Code``) holds the code positions of *every*
instruction of the frame's function: Celery's own ``trace_task``, the frame that catches
every task's exception, has 2,341, about 190 KB of tuples per retry, made, pickled, sent
and dropped again. A worker's children spend CPU on it, and the garbage comes in bursts
that raise their memory's high-water mark.

What the patch does (:func:`install`, by the tracker's worker bootstep before the pool
forks): each copy keeps only the position of the frame's own instruction
(``tb_lasti``), the others blank (:class:`Positions`). A traceback formatted from the copy
reads exactly as one formatted from the original.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any, Final

from smsbat_tracker.celery.compat import require
from smsbat_tracker.log import get_logger

__all__ = ["BELOW", "LOWEST", "PACKAGE", "Positions", "install"]

log = get_logger(__name__)

# The billiard versions whose traceback copy this patch was made for (and tested against).
PACKAGE: Final = "billiard"
LOWEST: Final = "4.2.0"
BELOW: Final = "4.4"

# Set on the patched Traceback class: installed already.
_MARK: Final = "_smsbat_lean"

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


def install() -> bool:
    """Make billiard's traceback copies keep one position per frame (once); True when
    applied, False (logged) when billiard's copy has not the shape this patch knows.

    Raises :class:`~smsbat_tracker.errors.UnsupportedVersion` (patching nothing) on a
    billiard outside ``LOWEST``..``BELOW``.
    """
    require(PACKAGE, LOWEST, BELOW)
    from billiard import einfo

    code_cls, traceback_cls = getattr(einfo, "_Code", None), getattr(einfo, "Traceback", None)
    if code_cls is None or traceback_cls is None:
        log.warning("compat.billiard_tracebacks_skipped", reason="no _Code or Traceback class")
        return False
    if getattr(traceback_cls, _MARK, False):
        return True
    if not isinstance(code_cls.__dict__.get("co_positions"), property):
        log.warning("compat.billiard_tracebacks_skipped", reason="_Code.co_positions changed")
        return False
    copy_code = code_cls.__init__
    copy_traceback = traceback_cls.__init__

    # Each wrapper names billiard's method it wraps (``__wrapped__``, for inspect.unwrap).
    @functools.wraps(copy_code)
    def code_init(self: Any, code: Any) -> None:
        copy_code(self, _WithoutPositions(code))

    @functools.wraps(copy_traceback)
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
    setattr(traceback_cls, _MARK, True)
    return True


def installed() -> bool:
    """Whether billiard's traceback copy carries this patch."""
    from billiard import einfo

    return bool(getattr(getattr(einfo, "Traceback", None), _MARK, False))
