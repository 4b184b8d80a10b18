"""The README's demo command, end to end (a real worker subprocess, the sandbox, Redis)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from smsbat_tracker.tools.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.fixture
def clean_environ(redis_url: str) -> Iterator[None]:
    """The demo exports its settings for the worker; give the environment back after."""
    saved = dict(os.environ)
    os.environ["REDIS_URL"] = redis_url
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("push", [False, True], ids=["poll", "push"])
def test_demo_tracks_every_message_to_its_true_outcome(clean_environ: None, push: bool) -> None:
    """The demo sends, tracks and prints outcomes that all match the sandbox's truth."""
    out = io.StringIO()
    assert run_demo(count=4, deadline=6, seed=1, push=push, out=out) == 0
    text = out.getvalue()
    assert "4/4 outcomes match the sandbox's truth" in text
    assert text.count("\n") > 6  # the table: a header, a rule and a row per message
    if push:
        assert "push mode" in text
        assert " push " in text  # at least one outcome came from a pushed status
