"""The layering, read from the source: every import (module level or inside a function) of
every .py under data/, models/, evaluation/, scripts/ and benchmarks/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "evaluation", "scripts", "benchmarks")
ENTRY_POINTS = ("train", "eval")  # train.py, eval.py
# (importing package, packages or modules it must not import)
FORBIDDEN = [
    ("models", ("evaluation",)),
    ("data", ("models", "evaluation")),
    ("scripts", ENTRY_POINTS),
    ("benchmarks", ENTRY_POINTS),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` resolved to pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    top = {name.split(".")[0] for name in known}
    return {name for name in found if name.split(".")[0] in top}


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    known = {module_name(p) for p in files} | set(PACKAGES) | set(ENTRY_POINTS)
    return {module_name(p): imports_of(p, known) for p in files}


def cycle_in(graph: dict[str, set[str]], scope: str) -> list[str] | None:
    """One import cycle among the modules of ``scope`` (as a path a -> ... -> a), or None."""
    nodes = {n for n in graph if n.split(".")[0] == scope}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN)
def test_layers_import_only_downwards(graph, package: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(f"{module} imports {name}" for module, names in graph.items()
                 if module.split(".")[0] == package
                 for name in names if name.split(".")[0] in forbidden)
    assert not bad, "; ".join(bad)


def test_models_have_no_import_cycle(graph) -> None:
    assert len([m for m in graph if m.startswith("models.")]) > 10  # the graph was read
    cycle = cycle_in(graph, "models")
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A cycle closed by an import inside a function (as one was) is still a cycle."""
    source = tmp_path / "a.py"
    source.write_text("import os\n\ndef f():\n    from models.b import g\n    return g\n")
    assert imports_of(source, {"models", "models.b"}) == {"models.b"}
    assert cycle_in({"models.a": {"models.b"}, "models.b": {"models.a"}}, "models") == [
        "models.a", "models.b", "models.a"]
