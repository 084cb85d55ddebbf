"""The public surface does not move under users: every name that README.md, docs/ and
docs/examples import from thinwire imports (from the code blocks, parsed), each from a module
of ``thinwire.PUBLIC_MODULES``; ``thinwire.__all__`` resolves; a moved module keeps a shim
that warns at import (``thinwire.trainer.config`` -> ``thinwire.config``)."""
import ast
import glob
import importlib
import importlib.util
import os
import re
import sys
import warnings

import pytest

from conftest import REPO

IMPORT = re.compile(r"^\s*from\s+(thinwire[\w.]*)\s+import\s+(\([^)]*\)|[^\n#;\"]+)|^\s*import\s+(thinwire[\w.]*)", re.M)


def code_of(path: str) -> str:
    """The code a user copies: fenced blocks and inline ``python -c "..."`` of a Markdown
    file, or the whole file for an example script."""
    text = open(path).read()
    if not path.endswith(".md"):
        return text
    blocks = re.findall(r"```[\w-]*\n(.*?)```", text, re.S)
    inline = re.findall(r'python -c "([^"]*)"', text)
    return "\n".join(blocks + [s.replace("; ", "\n") for s in inline])


def documented_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every thinwire import in the docs (name "" for ``import m``)."""
    files = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True),
             *glob.glob(os.path.join(REPO, "docs", "examples", "**", "*.py"), recursive=True)]
    out = []
    for path in sorted(files):
        for m in IMPORT.finditer(code_of(path)):
            rel = os.path.relpath(path, REPO)
            if m.group(3):
                out.append((rel, m.group(3), ""))
                continue
            for name in m.group(2).strip("() \n").split(","):
                name = name.split(" as ")[0].strip()
                if name:
                    out.append((rel, m.group(1), name))
    return out


DOCUMENTED = documented_imports()
# modules whose import loads a large optional package (Lightning: tens of seconds): their
# names are looked up in the source instead (tests/test_integrations.py imports them)
HEAVY = {"thinwire.integrations.lightning"}


def defined_in_source(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_the_docs_import_something():
    modules = {m for _, m, _ in DOCUMENTED}
    assert len(DOCUMENTED) > 20 and {"thinwire", "thinwire.config", "thinwire.comm"} <= modules


@pytest.mark.parametrize("where,module,name", DOCUMENTED, ids=[f"{f}:{m}:{n}" for f, m, n in DOCUMENTED])
def test_every_documented_name_imports(where, module, name):
    import thinwire

    assert module in thinwire.PUBLIC_MODULES, f"{where} imports from {module}: name it in thinwire.PUBLIC_MODULES"
    if module in HEAVY:
        assert importlib.util.find_spec(module) and (not name or name in defined_in_source(module)), f"{where}"
        return
    mod = importlib.import_module(module)
    if name:
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{where}: {module}.{name}"


def test_all_resolves():
    import thinwire

    for name in thinwire.__all__:
        assert getattr(thinwire, name) is not None, name


def test_moved_module_keeps_a_warning_shim():
    sys.modules.pop("thinwire.trainer.config", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from thinwire.trainer.config import compose
    assert any(issubclass(w.category, DeprecationWarning) and "thinwire.config" in str(w.message) for w in caught)
    from thinwire.config import compose as moved

    assert compose is moved
