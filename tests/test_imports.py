"""The package's import graph has no cycle.

Builds the graph of ``src/conceptevo`` from the source (the AST, not by importing): an edge
``a -> b`` for every import of ``b`` that runs when ``a`` is imported, i.e. statements at module
level, including those under a module-level ``if``/``try``, but not ``if TYPE_CHECKING:`` blocks
and not imports inside functions (those run later, on call). ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg``. Importing ``pkg.sub`` also imports
``pkg`` (its ``__init__``), so that edge is added too.

A second test adds the imports inside functions (all but a short, explained list of upward ones),
so that no cycle hides behind a late import.

Run it alone: ``python -m pytest -q tests/test_imports.py`` (or ``python tests/test_imports.py
[--deferred]``, which prints every cycle it finds).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "conceptevo"


def _modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in (src / package).rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module, deferred: bool = False):
    """Import statements that run when the module is imported (``deferred``: also those in
    functions and type-checking blocks, which run later or never)."""
    if deferred:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body)
            stack.extend(node.orelse)
            stack.extend(node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)
        elif isinstance(node, ast.With):
            stack.extend(node.body)


def import_graph(
    src: Path = SRC, package: str = PACKAGE, deferred: bool = False
) -> dict[str, set[str]]:
    modules = _modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _module_level_imports(tree, deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c; a package that encloses
                # the importing module is already being imported then, so only an explicit import
                # of it (``from . import name`` defined in the package's __init__) is an edge
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    implicit = i < len(parts)
                    if dep not in modules or dep == name:
                        continue
                    if implicit and name.startswith(dep + "."):
                        continue
                    edges.add(dep)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each with one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, comp) for comp in components]


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete path start -> ... -> start inside one strongly connected component."""
    members = set(comp)
    start = comp[0]
    # breadth-first search back to start
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if v != start else [start, start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_graph_sees_the_package():
    graph = import_graph()
    # a known module-level edge, so that an empty or broken graph cannot pass
    assert "conceptevo.workspace" in graph
    assert "conceptevo.errors" in graph["conceptevo.workspace"] or graph["conceptevo.workspace"]


def test_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import d\n"
        "def f():\n    from .. import d\nfrom ..a import something\n"
    )
    (pkg / "d.py").write_text("from .sub import c\n")
    (pkg / "sub" / "e.py").write_text("from .c import f\n")  # sibling: pkg.sub is loading already
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.c"] == {"pkg.a"}  # not d: type-checking and in-function imports
    assert graph["pkg.sub.e"] == {"pkg.sub.c"}
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    assert set(cycles[0]) == {"pkg.a", "pkg.b", "pkg.sub.c"}
    assert cycles[0][0] == cycles[0][-1]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


# Imports inside functions that point back up the layering, each on purpose. Any other function-level
# import of the package must not close a cycle: a cycle dodged by a late import is still a cycle.
UPWARD = {
    ("conceptevo.workspace", "conceptevo.results"):
        "Workspace.from_results, a documented shortcut to conceptevo.results.workspace_from_results",
}


def test_no_cycle_dodged_by_a_late_import():
    graph = import_graph(deferred=True)
    for a, b in UPWARD:
        assert b in graph.get(a, ()), f"{a} no longer imports {b}: remove that entry from UPWARD"
        parts = b.split(".")
        graph[a] = graph[a] - {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # b and its packages
    cycles = find_cycles(graph)
    assert not cycles, "import cycles through function-level imports:\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_package_exports_are_visible_to_tools():
    """``conceptevo``'s lazy names are in ``dir()`` and in its type-checking imports (what IDEs read)."""
    import conceptevo

    assert set(conceptevo._EXPORTS) <= set(dir(conceptevo))
    tree = ast.parse((SRC / PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    typed = {}
    for node in tree.body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for imp in node.body:
                for alias in imp.names:
                    typed[alias.asname or alias.name] = "." + imp.module
    assert typed == conceptevo._EXPORTS  # the same names, from the same modules


if __name__ == "__main__":
    import sys

    found = find_cycles(import_graph(deferred="--deferred" in sys.argv))  # --deferred: also imports in functions
    for cycle in found:
        print(" -> ".join(cycle))
    print(f"{len(found)} cycle(s)")
