"""No import cycle inside thinwire/comm or thinwire/trainer (tools/import_graph.py), and the
tool does find a cycle when there is one."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import import_graph  # noqa: E402


def graph(package_dir):
    mods = import_graph.modules(package_dir)
    return {m: import_graph.imports(m, path, set(mods)) for m, path in mods.items()}


def test_comm_and_trainer_have_no_cycle():
    for package in ("thinwire/comm", "thinwire/trainer"):
        g = graph(package)
        assert len(g) > 5, package
        assert import_graph.cycles(g) == [], package


def test_a_cycle_is_found():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert not import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": set()})
