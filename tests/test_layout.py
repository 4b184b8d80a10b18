"""The package's layout: what the README's Development section draws, checked.

The import direction between the layers is import-linter's contract (pyproject's
``[tool.importlinter]``, run by ``make lint``); these tests pin what it does not: no import
circle between any two modules, no module past the size a newcomer can read, a reason to
exist for each subpackage, and a test for every Lua script.
"""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "smsbat_tracker"
TESTS = Path(__file__).resolve().parent
# A module past this many lines does more than one thing (the "about 500").
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_import_circles() -> None:
    """No two modules import each other, directly or through others (lazy imports too)."""
    graph = grimp.build_graph("smsbat_tracker")
    # The root package's lazy names load the Celery face on first use; it is the door,
    # not a layer, so its imports don't count as the children importing it back.
    for child in graph.find_modules_directly_imported_by("smsbat_tracker"):
        graph.remove_import(importer="smsbat_tracker", imported=child)
    assert _cycles(graph) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path: Path) -> None:
    """Every module stays within MAX_LINES lines."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines"


def test_each_subpackage_says_why_it_exists() -> None:
    """Each subpackage's __init__ opens with a one-line docstring: its reason to exist."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, f"{init.relative_to(PACKAGE)} has no docstring"
        assert doc.splitlines()[0].strip(), init


def _wrappers() -> dict[str, list[str]]:
    """Script file -> the store's classes that run it (``file = "<name>.lua"``)."""
    found: dict[str, list[str]] = {}
    for module in (PACKAGE / "store").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and [getattr(t, "id", None) for t in stmt.targets] == ["file"]
                    and isinstance(stmt.value, ast.Constant)
                ):
                    found.setdefault(str(stmt.value.value), []).append(node.name)
    return found


def test_every_lua_script_has_a_test() -> None:
    """Each script in store/lua has a wrapper, which a tests/test_lua_*.py file runs."""
    scripts = sorted(p.name for p in (PACKAGE / "store" / "lua").glob("*.lua"))
    assert scripts
    tested = "\n".join(p.read_text(encoding="utf-8") for p in TESTS.glob("test_lua_*.py"))
    wrappers = _wrappers()
    untested = [
        script
        for script in scripts
        if not any(re.search(rf"\b{name}\b", tested) for name in wrappers.get(script, []))
    ]
    assert untested == []


def test_no_lua_in_python() -> None:
    """No Python module of the package holds Lua text: scripts live in .lua files."""
    lua = re.compile(r"redis\.call\(")
    offenders = [
        str(p.relative_to(PACKAGE)) for p in _modules() if lua.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "patch",
    ["kombu_qos", "billiard_tracebacks", "retry", "celery_say", "celery_pool", "celery_reconnect"],
)
def test_pyproject_pins_each_patched_library_to_its_patchs_range(patch: str) -> None:
    """pyproject's requirement of each patched library is the range its patch checks."""
    module = importlib.import_module(f"smsbat_tracker.celery.compat.{patch}")
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text("utf-8"))
    specs = [
        dep.replace(" ", "")
        for dep in pyproject["project"]["dependencies"]
        if re.match(rf"{module.PACKAGE}(\[|>|<|=)", dep)
    ]
    assert len(specs) == 1, specs
    assert f"<{module.BELOW}" in specs[0]
    assert f">={module.LOWEST}".removesuffix(".0") in specs[0]
