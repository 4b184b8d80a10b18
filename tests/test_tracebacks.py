"""billiard's copies of retry tracebacks, trimmed to what a formatter reads."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.app import trace

from smsbat_tracker.celery.tracebacks import Positions, lean_copies


def _einfo() -> tuple[ExceptionInfo, list[str]]:
    """An ExceptionInfo of an exception raised two frames down, and the original's format."""

    def inner() -> int:
        values, names = [1, 2, 3], {"one": 1}
        return values[0] + names["missing"] * 2

    def outer() -> None:
        inner()

    try:
        outer()
    except KeyError as exc:
        return ExceptionInfo(), traceback.format_tb(exc.__traceback__)
    raise AssertionError("not raised")


def test_a_copied_traceback_formats_as_the_original() -> None:
    """The copy keeps each frame's own position: the same lines, carets included."""
    assert lean_copies()
    einfo, original = _einfo()
    assert traceback.format_tb(einfo.tb) == original  # type: ignore[arg-type]
    assert any("^" in line for line in original)  # 3.11 carets, read from the positions


def test_each_copied_frame_keeps_one_position_and_pickles_small() -> None:
    """No list of every instruction's position per frame; a pickled copy stays small."""
    assert lean_copies()
    einfo, _ = _einfo()
    tb: Any = einfo.tb
    while tb is not None:
        assert isinstance(tb.tb_frame.f_code._co_positions, Positions)
        tb = tb.tb_next
    again = pickle.loads(pickle.dumps(einfo))
    assert traceback.format_tb(again.tb) == traceback.format_tb(einfo.tb)  # type: ignore[arg-type]


def test_the_frame_that_catches_every_task_exception_costs_little() -> None:
    """Celery's trace_task has thousands of instructions; its copy pickles to a few
    hundred bytes instead of tens of kilobytes."""
    assert lean_copies()
    code = next(
        c
        for c in trace.build_tracer.__code__.co_consts
        if getattr(c, "co_name", "") == "trace_task"
    )
    assert len(list(code.co_positions())) > 1000
    positions = Positions(500, (1, 1, 0, 1), len(list(code.co_positions())))
    assert len(pickle.dumps(positions)) < 200
    assert len(list(positions)) == len(list(code.co_positions()))
    assert list(positions)[500] == (1, 1, 0, 1)
