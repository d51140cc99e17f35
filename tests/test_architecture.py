"""The layering rules of README's "Architecture" section, checked on the source: the static import graph
of the project's modules (sors, tasks, pipeline, bench; imports inside functions included) has no
cycle, no module is over 500 lines, and no layer imports upward (sors never imports tasks, pipeline,
ray or mlflow; tasks never imports pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sors", "tasks", "pipeline", "bench")
MAX_LINES = 500
# layer -> top-level names it must not import
FORBIDDEN = {"sors": {"tasks", "pipeline", "bench", "ray", "mlflow"}, "tasks": {"pipeline", "bench"}}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every Python file in the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports, at any depth (functions included; ``if TYPE_CHECKING:``
    blocks left out: they never run). ``from a import b`` yields ``a.b``; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                todo.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    prefix = package[: len(package) - child.level + 1]
                    base = ".".join(prefix + ([child.module] if child.module else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            todo.append(child)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: project modules it imports}`` (a name resolves to its longest project-module prefix)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(name) for name in imported_names(path, module)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


# ---------------------------------------------------------------- the checker checks


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline import b\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline.a import thing\n    return thing\n")
    (tmp_path / "pipeline" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import a\n"
    )
    modules = {m: p for m, p in project_modules(tmp_path).items()}
    graph = import_graph(modules)
    assert find_cycle(graph) in (["pipeline.a", "pipeline.b", "pipeline.a"], ["pipeline.b", "pipeline.a", "pipeline.b"])
    assert graph["pipeline.c"] == set()  # annotations only: no edge
    del graph["pipeline.b"]
    assert find_cycle(graph) is None


# ---------------------------------------------------------------- the project

MODULES = project_modules()
GRAPH = import_graph(MODULES)


def test_the_project_is_found():
    assert {"sors.train", "tasks.cells", "pipeline.cli", "pipeline.nightly.compare", "bench.cli"} <= set(MODULES)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_500_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)}: {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_import(layer):
    upward = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.split(".")[0] == layer
        for name in imported_names(path, module)
        if name.split(".")[0] in FORBIDDEN[layer]
    )
    assert not upward, "; ".join(upward)
