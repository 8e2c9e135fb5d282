"""The data pipeline's modules import one another one way: no cycle, not even through an import inside a
function (read from the source with `ast`, so lazy imports count); and the package's lazy re-exports resolve."""
from __future__ import annotations

import ast
from pathlib import Path

import fuxi.data_pipeline

ROOM = Path(fuxi.data_pipeline.__file__).parent
PACKAGE = "fuxi.data_pipeline"


def module_imports() -> dict[str, set[str]]:
    """module -> the modules of the room it imports, anywhere in its source."""
    modules = {p.stem for p in ROOM.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((ROOM / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from fuxi.data_pipeline import x`
        graph[name] = {m[len(PACKAGE) + 1:] for m in found if m.startswith(f"{PACKAGE}.")} & modules - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (a path that returns to its start), or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_modules_import_one_another_one_way():
    graph = module_imports()
    assert {"clean_stages", "job", "engine"} <= graph["clean"]  # the graph is read (driver -> steps -> engine)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_lazy_reexports_resolve():
    for name in fuxi.data_pipeline.__all__:
        value = getattr(fuxi.data_pipeline, name)  # imports the defining module named in the package's table
        assert getattr(value, "__name__", name) == name
