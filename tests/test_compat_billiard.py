"""billiard's copies of retry tracebacks, trimmed to what a formatter reads
(celery/compat/billiard_tracebacks.py), and what of billiard the trim relies on."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
import traceback
from importlib import metadata
from typing import Any

import pytest
from billiard import einfo
from billiard.einfo import ExceptionInfo
from celery.app import trace

from smsbat_tracker.celery.compat import billiard_tracebacks
from smsbat_tracker.celery.compat.billiard_tracebacks import Positions
from smsbat_tracker.errors import UnsupportedVersion


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
    assert billiard_tracebacks.install()
    einfo_, original = _einfo()
    assert traceback.format_tb(einfo_.tb) == original
    assert any("^" in line for line in original)  # 3.11 carets, read from the positions


def test_each_copied_frame_keeps_one_position_and_pickles_small() -> None:
    """No list of every instruction's position per frame; a pickled copy stays small."""
    assert billiard_tracebacks.install()
    einfo_, _ = _einfo()
    tb: Any = einfo_.tb
    while tb is not None:
        assert isinstance(tb.tb_frame.f_code._co_positions, Positions)
        tb = tb.tb_next
    again = pickle.loads(pickle.dumps(einfo_))
    assert traceback.format_tb(again.tb) == traceback.format_tb(einfo_.tb)


def test_the_frame_that_catches_every_task_exception_costs_little() -> None:
    """Celery's trace_task has thousands of instructions; its copy pickles to a few
    hundred bytes instead of tens of kilobytes."""
    assert billiard_tracebacks.install()
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


def test_billiards_copy_has_the_shape_the_trim_replaces() -> None:
    """billiard's own copy: ``_Code(code)`` keeps every position in ``_co_positions``, read
    back through the ``co_positions`` property; ``Traceback(tb, ...)`` copies each frame
    into ``tb_frame.f_code``, a ``_Code``."""
    assert isinstance(einfo._Code.__dict__.get("co_positions"), property)
    code = _einfo.__code__
    copy: Any = einfo._Code.__new__(einfo._Code)
    inspect.unwrap(einfo._Code.__init__)(copy, code)  # billiard's own, patched or not
    assert list(copy._co_positions) == list(code.co_positions())
    assert list(copy.co_positions()) == list(code.co_positions())
    params = list(inspect.signature(inspect.unwrap(einfo.Traceback.__init__)).parameters)
    assert params[:2] == ["self", "tb"]
    try:
        raise KeyError("x")
    except KeyError as exc:
        raw = exc.__traceback__
    assert raw is not None
    tb: Any = einfo.Traceback.__new__(einfo.Traceback)
    inspect.unwrap(einfo.Traceback.__init__)(tb, raw)
    assert isinstance(tb.tb_frame.f_code, einfo._Code)
    assert tb.tb_lasti == raw.tb_lasti


def test_an_unknown_billiard_version_is_refused_and_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A billiard outside the known range: UnsupportedVersion, and billiard left as it was."""
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "4.99.0" if name == "billiard" else real(name)
    )

    def unpatched(self: Any, *args: Any) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(einfo._Code, "__init__", unpatched)
    monkeypatch.setattr(einfo.Traceback, "__init__", unpatched)
    monkeypatch.setattr(einfo.Traceback, "_smsbat_lean", False, raising=False)
    with pytest.raises(UnsupportedVersion) as raised:
        billiard_tracebacks.install()
    assert raised.value.package == "billiard"
    inits: list[Any] = [einfo._Code.__init__, einfo.Traceback.__init__]
    assert inits == [unpatched, unpatched]
    assert not billiard_tracebacks.installed()


def test_nothing_is_patched_at_import() -> None:
    """Importing the patch module changes nothing; install() does, once (in a fresh
    interpreter: this one's billiard is patched by the other tests)."""
    code = (
        "from billiard import einfo\n"
        "from smsbat_tracker.celery.compat import billiard_tracebacks as b\n"
        "assert not b.installed()\n"
        "assert b.install(); init = einfo.Traceback.__init__\n"
        "assert b.install(); assert einfo.Traceback.__init__ is init\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
