"""The benchmarks' harness (bench/harness): every results file carries its manifest, a cached
run (the dense baseline among them) runs again when thinwire's code or configs change and not
when docs or tests do, one row catalogue serves every study, and no bench module edits
``sys.path``. Nothing here trains: the runner is replaced by a fake one."""
import argparse
import json
import os
import re

import pytest

from bench.harness import RESULTS, catalogue, manifest, quality, runs
from bench.harness import time_to_target as ttt
from conftest import REPO


def test_every_results_file_has_its_manifest():
    """bench/results/**: each file has an entry (command, commit, date, machine load) in its
    folder's MANIFEST.json, and no entry names a file that is not there (harness/manifest.py)."""
    assert manifest.problems(RESULTS) == []


def test_a_results_file_without_its_manifest_fails(tmp_path):
    (tmp_path / "table.md").write_text("| a |\n")
    assert manifest.problems(str(tmp_path)) == ["table.md: no entry in MANIFEST.json"]
    manifest.write(str(tmp_path / "doc.json"), {"x": 1}, "bench/quality.py", ["--rows", "local H=8"])
    assert manifest.problems(str(tmp_path)) == ["table.md: no entry in MANIFEST.json"]
    manifest.record([str(tmp_path / "table.md")], command="python bench/quality.py --report")
    assert manifest.problems(str(tmp_path)) == []
    doc = json.loads((tmp_path / "MANIFEST.json").read_text())
    e = doc["doc.json"]
    assert e["command"] == "python bench/quality.py --rows 'local H=8'"
    assert re.fullmatch(r"[0-9a-f]{40}", e["commit"]) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["date"])
    assert e["machine_load"].startswith("loadavg ")
    del doc["table.md"]["machine_load"]  # an entry without a field fails too
    (tmp_path / "MANIFEST.json").write_text(json.dumps(doc))
    assert manifest.problems(str(tmp_path)) == ["table.md: no 'machine_load'"]
    (tmp_path / "doc.json").unlink()  # and an entry whose file is gone
    assert manifest.problems(str(tmp_path)) == ["table.md: no 'machine_load'", "doc.json: in MANIFEST.json but not there"]
    (tmp_path / "runs").mkdir()  # run caches are not results
    (tmp_path / "runs" / "metrics.jsonl").write_text("{}\n")
    assert len(manifest.problems(str(tmp_path))) == 2


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository of four files, the runs' code version computed from it."""
    for rel in ("thinwire/comm/sparse.py", "configs/comm/topk.yaml", "docs/comm.md", "tests/test_x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    monkeypatch.setattr(runs, "REPO", str(tmp_path))
    runs.code_version.cache_clear()
    yield tmp_path
    runs.code_version.cache_clear()


def test_cached_dense_baseline_reruns_when_thinwires_code_changes(fake_repo, tmp_path, monkeypatch):
    """The quality harness's dense row through its own cache (``quality.run``), the launcher
    replaced by one that writes the run's last metrics row: reused while the code is the same
    (docs and tests may change), run again after a change under thinwire/ or configs/."""
    launched = []

    def fake_launch(ov, d, meta, label, fresh=True):
        launched.append(d)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
            fh.write(json.dumps({"step": 4, "loss": 3.0, "val_loss": 2.5}) + "\n")

    monkeypatch.setattr(runs, "launch", fake_launch)
    monkeypatch.setattr(quality, "RUNS", str(tmp_path / "runs"))
    a = argparse.Namespace(lr=3e-3, steps=4, eval_every=4, nproc=4)

    def dense():
        runs.code_version.cache_clear()  # a new process: the code version is read again
        return quality.run("dense", 0, a)[-1]["val_loss"]

    assert dense() == 2.5 and len(launched) == 1
    assert dense() == 2.5 and len(launched) == 1  # cached
    for rel in ("docs/comm.md", "tests/test_x.py"):
        (fake_repo / rel).write_text("v2\n")
        assert dense() == 2.5 and len(launched) == 1, rel  # not the code: still cached
    for n, rel in enumerate(("thinwire/comm/sparse.py", "configs/comm/topk.yaml"), start=2):
        (fake_repo / rel).write_text("v2\n")
        assert dense() == 2.5 and len(launched) == n, rel  # the code changed: run again
    assert len(set(launched)) == 3
    # the time-to-target protocol's runs are keyed the same way
    ov = ["comm=none", "sync=ddp"]
    before = ttt._dir("const", ov)
    (fake_repo / "thinwire" / "comm" / "sparse.py").write_text("v3\n")
    runs.code_version.cache_clear()
    assert ttt._dir("const", ov) != before and os.path.basename(before).startswith("const-")


def test_code_version_reads_the_real_sources():
    runs.code_version.cache_clear()
    v = runs.code_version()
    assert re.fullmatch(r"[0-9a-f]{12}", v) and runs.code_version() == v
    assert runs.run_key(["a"], "x") != runs.run_key(["a"], "y") and runs.run_key(["a"], "x") != runs.run_key(["b"], "x")


def test_one_catalogue_serves_every_study():
    """Each study's rows are names in the catalogue: the quality sets, the time-to-target rows
    (the protocol's own and the network clock's), the cluster matrix's and the clock
    validation's (built from it), the presets (configs/experiment) and the projections' protocol
    rows."""
    from bench.harness import netclock_project, netclock_validate

    rows = set(catalogue.ROWS)
    assert {r for names in catalogue.SETS.values() for r in names for r in [r.split("@")[0]]} <= rows
    assert set(catalogue.TTT_ROWS) | set(catalogue.CLOCK_TTT_ROWS) <= rows
    assert set(ttt.ROWS) == set(catalogue.TTT_ROWS)
    projected = {prow for _, prow, _ in netclock_project.methods() if prow}
    assert projected <= rows, projected - rows
    assert all(ov == catalogue.spelt(row) for (label, *_, ov), row in
               zip(netclock_validate.ROWS, ("dense", "bf16", "int8 two-phase + ef", "topk 1% + ef", "local H=8",
                                            "co2 H=8", "eager H=8", "stream H=8 F=2 tau=1")))
    experiments = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "experiment")) if f.endswith(".yaml"))
    assert list(catalogue.preset_rows()) == ["default", *experiments]
    assert [catalogue.period(r) for r in ("dense", "local H=8", "sparseloco H=15", catalogue.NEVER,
                                          "torch PostLocalSGD H=8")] == [1, 8, 15, 1, 8]
    with pytest.raises(KeyError, match="unknown row 'gossip'"):
        catalogue.overrides("gossip")


def test_no_bench_module_edits_sys_path():
    bench = os.path.join(REPO, "bench")
    hits = [os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(bench) for f in fs
            if f.endswith(".py") and re.search(r"sys\.path\.(insert|append)|sys\.path\[|sys\.path \+?=",
                                               open(os.path.join(d, f)).read())]
    assert hits == []
