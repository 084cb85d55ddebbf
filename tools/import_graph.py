"""Which modules of a package import which (static, from the source: every ``import`` and
``from ... import`` of a sibling module, at module level or inside a function), and whether
the graph has a cycle. From the repository root::

    python tools/import_graph.py                    # thinwire/comm
    python tools/import_graph.py thinwire/trainer   # another package

Prints one line per module (``a -> b, c``) and the cycles found; exits 1 if there is one.
Imports only needed for type checking (under ``if TYPE_CHECKING:``) count too.
"""
from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package_dir: str) -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    root = os.path.relpath(os.path.join(REPO, package_dir), REPO)
    out = {}
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            # "from . import x": x is a module, or a name defined in the package
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str]) -> int:
    package_dir = argv[0] if argv else os.path.join("thinwire", "comm")
    mods = modules(package_dir)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    prefix = os.path.commonprefix(list(mods)).rpartition(".")[0] + "."
    for m in sorted(graph):
        deps = ", ".join(sorted(d.removeprefix(prefix) for d in graph[m])) or "-"
        print(f"{m.removeprefix(prefix):24s} -> {deps}")
    found = cycles(graph)
    for c in found:
        print("cycle among: " + ", ".join(x.removeprefix(prefix) for x in c))
    print(f"{len(mods)} modules, {sum(len(d) for d in graph.values())} imports, "
          f"{len(found)} cycle{'s' if len(found) != 1 else ''}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
