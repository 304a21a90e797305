"""Floors, not circles (STYLE 19): no import cycle between the subpackages of ``modus_mega``.

A unit is a subpackage (``training``, ``parallel``, ...) or a top-level module (``config``,
``losses``, ...). Every ``import`` statement of the package's own files counts, at module
level and inside functions alike: a function-local import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "modus_mega"


def _unit(path: Path, package: Path) -> str:
    """The unit a file belongs to: its subpackage, or its own name for a top-level module."""
    first = path.relative_to(package).parts[0]
    return first.removesuffix(".py")


def _imported_units(tree: ast.AST, package: Path) -> set[str]:
    """The units of ``package`` that the import statements anywhere in ``tree`` name."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    units = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == package.name and len(parts) > 1:
            if (package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file():
                units.add(parts[1])
    return units


def import_graph(package: Path) -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        unit = _unit(path, package)
        if unit == "__init__":
            continue
        imported = _imported_units(ast.parse(path.read_text(), str(path)), package)
        graph.setdefault(unit, set()).update(imported - {unit, "__init__"})
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one unit (each is a cycle or several)."""
    reach = {unit: _reachable(graph, unit) for unit in graph}
    components = {frozenset(u for u in graph if u in reach[v] and v in reach[u]) | {v} for v in graph}
    return sorted((c for c in components if len(c) > 1), key=sorted)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle_between_subpackages() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, f"import cycles between units of modus_mega: {[sorted(c) for c in found]}"


def test_the_check_sees_function_local_imports(tmp_path: Path) -> None:
    """A cycle closed only by an import inside a function is still found."""
    package = tmp_path / "modus_mega"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    (package / "low" / "a.py").write_text("def f():\n    from modus_mega.high.b import g\n")
    (package / "high" / "b.py").write_text("from modus_mega.low import a\n")
    (package / "config.py").write_text("import modus_mega.low.a\n")
    graph = import_graph(package)
    assert graph == {"low": {"high"}, "high": {"low"}, "config": {"low"}}
    assert cycles(graph) == [frozenset({"low", "high"})]
