"""Which modules of a package import which (static, from the source: every ``import`` and
``from ... import`` of a sibling module, at module level or inside a function), and whether
the graph has a cycle. From the repository root::

    python tools/import_graph.py                    # thinwire/comm
    python tools/import_graph.py thinwire/trainer   # another package
    python tools/import_graph.py --packages         # thinwire: its packages, cycles and layers

Prints one line per module (``a -> b, c``) and the cycles found; exits 1 if there is one.
Imports only needed for type checking (under ``if TYPE_CHECKING:``) count too.

``--packages`` folds the modules of each subpackage of ``thinwire`` (``thinwire.comm.hooks``
-> ``comm``; a top-level module is its own package) into one node, so that two packages
importing each other through different modules show as a cycle, and checks the layers
(:data:`LAYERS`): a package imports only packages of its own layer or below.
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


#: thinwire's layers, bottom first: a package imports only its own layer and those below.
#: ``config`` assembles the parts and nothing below it imports it; the entry points and the
#: public API facades sit on top.
LAYERS = [
    ("base", {"errors", "options", "registry", "tensors", "configdiff"}),
    ("parts", {"comm", "optim", "models", "data"}),
    ("trainer", {"trainer", "elastic"}),
    ("config", {"config"}),
    ("entry points", {"train", "hydra_app", "report", "outer_loop", "meter", "integrations", "thinwire"}),
]


#: modules kept at an old path for a release, importing their new home: on the top layer
#: whatever their path (``thinwire.trainer.config`` -> ``thinwire.config``)
SHIMS = {"thinwire.trainer.config": "shims"}
LAYERS[-1][1].add("shims")


def package_of(module: str, root: str = "thinwire") -> str:
    """``thinwire.comm.hooks`` -> ``comm``; ``thinwire.train`` -> ``train``; ``thinwire`` -> itself."""
    if module in SHIMS:
        return SHIMS[module]
    parts = module.split(".")
    return parts[1] if parts[0] == root and len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """The package-level graph of a module graph, and for each package edge the module
    imports that make it (``a.x -> b.y``)."""
    pkgs: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for m, deps in graph.items():
        pm = package_of(m)
        pkgs.setdefault(pm, set())
        for d in deps:
            pd = package_of(d)
            if pd != pm:
                pkgs[pm].add(pd)
                why.setdefault((pm, pd), []).append(f"{m} -> {d}")
    return pkgs, why


def layer_errors(pkgs: dict[str, set[str]], why: dict, layers=LAYERS) -> list[str]:
    """Each import of a package from a higher layer (or of a package in no layer)."""
    level = {p: i for i, (_, members) in enumerate(layers) for p in members}
    out = []
    for p in sorted(pkgs):
        if p not in level:
            out.append(f"{p}: in no layer (tools/import_graph.py LAYERS)")
            continue
        for d in sorted(pkgs[p]):
            if level.get(d, len(layers)) > level[p]:
                out.append(f"{p} ({layers[level[p]][0]}) imports {d} "
                           f"({layers[level[d]][0] if d in level else 'no layer'}): {'; '.join(sorted(why[(p, d)]))}")
    return out


def main_packages(package_dir: str) -> int:
    mods = modules(package_dir)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    pkgs, why = package_graph(graph)
    for p in sorted(pkgs):
        print(f"{p:24s} -> {', '.join(sorted(pkgs[p])) or '-'}")
    module_cycles, package_cycles = cycles(graph), cycles(pkgs)
    errors = layer_errors(pkgs, why)
    for c in module_cycles:
        print("module cycle among: " + ", ".join(c))
    for c in package_cycles:
        print("package cycle among: " + ", ".join(c))
    for e in errors:
        print("layering: " + e)
    print(f"{len(mods)} modules in {len(pkgs)} packages: {len(module_cycles)} module cycles, "
          f"{len(package_cycles)} package cycles, {len(errors)} layering errors")
    return 1 if module_cycles or package_cycles or errors else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--packages":
        return main_packages(argv[1] if len(argv) > 1 else "thinwire")
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
