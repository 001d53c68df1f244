"""The package's import graph has no cycle.

Built from the source (the AST of every module of fastdmtg/, kernels/ → fastdmtg.kernels and
pipelines/ → fastdmtg.pipelines), not from what Python happened to import: function-local imports
count as much as top-level ones (a cycle hidden inside a function is still a layering knot, and it
becomes a real one the day someone moves the import up), relative and absolute imports alike;
``from . import x`` points at the module ``x`` when there is one. Imports under ``if TYPE_CHECKING:``
are left out (they never run). Importing ``a.b.c`` from outside package ``a.b`` also runs
``a/b/__init__.py``, so the edge goes to that package too.
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
#: folder → the package name it is installed as (setup.py's package_dir)
PACKAGE_DIRS = {"fastdmtg": "fastdmtg", "kernels": "fastdmtg.kernels", "pipelines": "fastdmtg.pipelines"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its __init__.py)."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "fastdmtg" and parts and parts[0] in ("kernels", "pipelines"):
                continue            # not there today; they would be shadowed by package_dir anyway
            out[".".join([pkg, *parts])] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those inside ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)          # the else branch runs
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node, name: str, is_pkg: bool, modules) -> set[str]:
    """The package's modules one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module
    out = set()
    for a in node.names:
        sub = f"{mod}.{a.name}"
        out.add(sub if sub in modules else mod)      # ``from pkg import module`` → that module
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the package's modules it imports} (see the module doc for what counts)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        is_pkg = f.name == "__init__.py"
        edges = set()
        for node in _imports(ast.parse(f.read_text(), str(f))):
            for t in _targets(node, name, is_pkg, files):
                # the module, or the nearest package above it that is one of ours
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if not t:
                    continue
                edges.add(t)
                own = name if is_pkg else name.rpartition(".")[0]
                parent = t.rpartition(".")[0]       # packages above t that are not already running
                while parent and not (own == parent or own.startswith(parent + ".")):
                    edges.add(parent)
                    parent = parent.rpartition(".")[0]
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through each module that lies on one, each cycle once, as [a, b, ..., a]
    (Tarjan's strongly connected components, then a breadth-first search inside each)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def strong(v):                      # iterative Tarjan (the graph is small, but no recursion limit)
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out, seen = [], set()
    for comp in sorted(comps, key=min):
        if len(comp) < 2:
            continue
        for start in sorted(comp):          # a shortest cycle through each member, each cycle once
            c = _shortest_cycle(graph, set(comp), start)
            key = frozenset(zip(c, c[1:]))
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def _shortest_cycle(graph, members: set[str], start: str) -> list[str]:
    """The shortest cycle [start, ..., start] inside ``members`` (breadth-first)."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for u in frontier:
            for w in sorted(graph[u] & members):
                if w == start:
                    path = [u]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = u
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start}: no cycle in its component")


def test_graph_sees_every_kind_of_import(tmp_path):
    """The graph builder on a planted package: top-level, function-local, relative (one and two
    levels), ``from . import module``, ``import a.b``; TYPE_CHECKING imports ignored; the package
    __init__ of an imported module counted from outside it; the cycle is reported."""
    p = tmp_path / "fastdmtg"
    (p / "sub").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "pipelines").mkdir()
    (p / "__init__.py").write_text("")
    (p / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                            "def f():\n    from .sub import leaf\n")
    (p / "b.py").write_text("import fastdmtg.sub.leaf\n")
    (p / "c.py").write_text("from . import a\n")
    (p / "sub" / "__init__.py").write_text("")
    (p / "sub" / "leaf.py").write_text("import os\nfrom ..c import x\nfrom .. import a\n")
    (tmp_path / "pipelines" / "__init__.py").write_text("from fastdmtg.b import y\n")
    g = import_graph(tmp_path)
    assert g["fastdmtg.a"] == {"fastdmtg.sub.leaf", "fastdmtg.sub"}          # not c (TYPE_CHECKING)
    assert g["fastdmtg.b"] == {"fastdmtg.sub.leaf", "fastdmtg.sub"}
    assert g["fastdmtg.c"] == {"fastdmtg.a"}
    assert g["fastdmtg.sub.leaf"] == {"fastdmtg.c", "fastdmtg.a"}           # not its own package
    assert g["fastdmtg.pipelines"] == {"fastdmtg.b"}
    assert cycles(g) == [["fastdmtg.a", "fastdmtg.sub.leaf", "fastdmtg.a"],
                         ["fastdmtg.c", "fastdmtg.a", "fastdmtg.sub.leaf", "fastdmtg.c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles():
    """No import cycle in the package, function-local imports included."""
    found = cycles(import_graph())
    for c in found:
        print("import cycle:", " -> ".join(c))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


if __name__ == "__main__":            # python tests/test_imports.py: the cycles, one per line
    for c in cycles(import_graph()):
        print(" -> ".join(c))
