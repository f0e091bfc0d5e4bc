"""The package's import graph: no cycles (imports inside functions count), nothing imports the package face, and
the ground floor (files, hooks, anatomy, precision) imports nothing of leantune's.

The graph is read from the source with ``ast``: ``from . import x`` is an edge to the submodule ``x`` where one
exists, else to the package; importing a submodule's parent package on the way is not counted (Python does it for
every import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import leantune

ROOT = Path(leantune.__file__).parent
GROUND_FLOOR = ("leantune.files", "leantune.hooks", "leantune.anatomy", "leantune.precision")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "leantune"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "leantune":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    edges.add(sub if sub in mods else target)
        graph[name] = {e for e in edges if e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_the_package_face():
    graph = import_graph()
    assert sorted(m for m, edges in graph.items() if "leantune" in edges and m != "leantune") == []


def test_the_ground_floor_imports_nothing_of_leantune():
    graph = import_graph()
    for name in GROUND_FLOOR:
        assert name in graph, f"{name} is missing"
        assert graph[name] == set(), f"{name} imports {sorted(graph[name])}"
