"""The architecture holds: imports inside fxquant (+ fxquant.patterns, fxquant.kernels) point down the layers
of docs/design.md only, and no import cycle exists, function-level (lazy) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import fxquant

ROOT = Path(fxquant.__file__).resolve().parent
SOURCES = {"fxquant": ROOT, "fxquant.patterns": Path(fxquant.patterns.__file__).resolve().parent,
           "fxquant.kernels": Path(fxquant.kernels.__file__).resolve().parent}

# Bottom to top; a module may import its own layer's modules (without a cycle) and any layer below it.
LAYERS = [
    ("fxquant.kernels", "fxquant.errors", "fxquant._layout"),
    ("fxquant.ir",),
    ("fxquant.patterns", "fxquant.frontend"),
    ("fxquant.targets",),
    ("fxquant.config", "fxquant.plan"),
    ("fxquant.weights",),
    ("fxquant.passes",),
    ("fxquant.program", "fxquant.generation", "fxquant.compiled"),
    ("fxquant.export", "fxquant.tools"),
    ("fxquant.api",),
    ("fxquant.app", "fxquant.__main__", "fxquant"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if package == "fxquant" and any(part in ("patterns", "kernels") for part in path.relative_to(folder).parts[:1]):
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                mod = ".".join([*prefix, mod]) if mod else ".".join(prefix)
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[0]


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for target in _imports(name, path, set(modules)):
            g.add_edge(name, target)
    return g


def test_no_import_cycle():
    g = _graph()
    # a package's __init__ importing its own children is not a cycle of the architecture
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down():
    g = _graph()
    upward = [(a, b) for a, b in g.edges if not b.startswith(a + ".") and _layer(b) > _layer(a)]
    assert not upward, "imports pointing up the layers: " + ", ".join(f"{a} -> {b}" for a, b in sorted(upward))


def test_the_checker_sees_cycles_and_upward_imports():
    """The two tests above can fail: on a graph with a planted cycle and upward edge they report both."""
    g = nx.DiGraph([("fxquant.ir.ops", "fxquant.api"), ("fxquant.api", "fxquant.ir.ops")])
    assert [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert _layer("fxquant.api") > _layer("fxquant.ir.ops")
    assert len(_graph()) >= 40  # every module of the three packages is in the graph
