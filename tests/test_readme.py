"""The README's "In your Celery app" section says what the example project does."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SHOP = ROOT / "examples" / "django_shop"


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _code_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_celery_app_lines_are_the_examples() -> None:
    """Each file the section quotes (``# shop/celery.py`` ...) holds the quoted code lines,
    in order: the README cannot drift from the project its tests run."""
    section = _section("In your Celery app")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    quoted = re.split(r"^# (shop/\S+\.py)\n", blocks[0], flags=re.MULTILINE)[1:]
    files = dict(zip(quoted[::2], quoted[1::2], strict=True))
    assert set(files) == {"shop/celery.py", "shop/__init__.py", "shop/settings.py"}
    for name, code in files.items():
        source = [line.strip() for line in (SHOP / name).read_text(encoding="utf-8").splitlines()]
        position = 0
        for line in _code_lines(code):
            assert line.strip() in source[position:], f"{name}: {line!r}"
            position = source.index(line.strip(), position) + 1
    assert "smsbat_tracker.init_app(app)" in files["shop/celery.py"]


def test_the_tracking_call_is_the_examples() -> None:
    """The section's ``track_message.delay`` call is the one the example's orders make."""
    section = _section("In your Celery app")
    tasks = (SHOP / "orders" / "tasks.py").read_text(encoding="utf-8")
    for line in (
        "on_delivered=mark_notified.s(order.pk),",
        "on_failed=schedule_retry.s(order.pk),",
    ):
        assert line in section
        assert line in tasks
