"""The import graph of the whole thinwire package (tools/import_graph.py): no module cycle,
no package cycle, and the layers errors/options <- comm, optim, models, data <- trainer <-
config <- entry points hold; and the tool does find a cycle or a layering error when there is one."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import import_graph  # noqa: E402


def graph(package_dir):
    mods = import_graph.modules(package_dir)
    return {m: import_graph.imports(m, path, set(mods)) for m, path in mods.items()}


def test_thinwire_has_no_cycle_and_keeps_its_layers():
    g = graph("thinwire")
    assert len(g) > 60
    assert import_graph.cycles(g) == []
    pkgs, why = import_graph.package_graph(g)
    assert {"comm", "optim", "trainer", "config", "train"} <= set(pkgs)
    assert import_graph.cycles(pkgs) == []
    assert import_graph.layer_errors(pkgs, why) == []
    assert "config" not in set().union(*(pkgs[p] for p in ("comm", "optim", "models", "data", "trainer")))


def test_a_cycle_is_found():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert not import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": set()})


def test_a_package_cycle_and_a_layering_error_are_found():
    g = {"thinwire.trainer.loop": {"thinwire.config.resume"}, "thinwire.config.rules": {"thinwire.trainer.rundir"},
         "thinwire.config.resume": set(), "thinwire.trainer.rundir": set()}
    assert import_graph.cycles(g) == []  # no module cycle ...
    pkgs, why = import_graph.package_graph(g)
    assert import_graph.cycles(pkgs) == [["config", "trainer"]]  # ... but a package cycle
    errors = import_graph.layer_errors(pkgs, why)
    assert errors == ["trainer (trainer) imports config (config): thinwire.trainer.loop -> thinwire.config.resume"]
