"""thinwire-report on fixture runs written here: PNGs, HTML, Markdown numbers, sweeps, errors."""
from __future__ import annotations

import json
import os

import pytest

from thinwire.report import main

PNGS = ("loss_vs_step.png", "loss_vs_time.png", "loss_vs_wire.png", "throughput.png", "wire_per_step.png")


def write_run(run_dir, losses, step_time, wire, dense=4000, val=None, unit="tokens_per_s", overrides=None):
    """A metrics.jsonl with one line per step; ``val`` maps step -> val_loss."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for i, loss in enumerate(losses):
            step = i + 1
            rec = {"step": step, "loss": loss, "lr": 1e-3, "step_time_s": step_time[i], "comm_wait_s": 0.01,
                   "wire_bytes": wire[i], "dense_bytes": dense, unit: 100.0 / step_time[i]}
            if val and step in val:
                rec["val_loss"] = val[step]
            fh.write(json.dumps(rec) + "\n")
    if overrides:
        os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
        with open(os.path.join(run_dir, ".hydra", "overrides.yaml"), "w") as fh:
            fh.write("".join(f"- {o}\n" for o in overrides))


def md_rows(path):
    """The summary table of summary.md as {run name: {column: cell}}."""
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_two_runs(tmp_path, capsys):
    dense_run, topk_run = tmp_path / "runs" / "dense", tmp_path / "runs" / "topk"
    a = dict(losses=[4.0, 3.5, 3.0, 2.5], step_time=[0.5, 0.5, 0.5, 0.5], wire=[4000] * 4, val={2: 3.6, 4: 2.7})
    b = dict(losses=[4.0, 3.7, 3.3, 3.1], step_time=[0.25, 0.25, 0.25, 0.25], wire=[100, 100, 100, 200],
             val={2: 3.8, 4: 3.2}, unit="samples_per_s")
    write_run(dense_run, **a)
    write_run(topk_run, **b)
    out = tmp_path / "rep"
    assert main([str(dense_run), str(topk_run), "--out", str(out)]) == 0

    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png

    rows = md_rows(out / "summary.md")
    assert set(rows) == {"dense", "topk"}
    wire_a, wire_b = sum(a["wire"]), sum(b["wire"])
    time_a, time_b = sum(a["step_time"]), sum(b["step_time"])
    d, t = rows["dense"], rows["topk"]
    assert d["steps"] == t["steps"] == "4"
    assert float(d["final loss"]) == pytest.approx(2.5) and float(t["final loss"]) == pytest.approx(3.1)
    assert float(d["final val_loss"]) == pytest.approx(2.7) and float(t["final val_loss"]) == pytest.approx(3.2)
    assert float(d["total time (s)"]) == pytest.approx(time_a) and float(t["total time (s)"]) == pytest.approx(time_b)
    assert float(d["total wire MB"]) == pytest.approx(wire_a / 1e6, abs=1e-3)
    assert float(t["total wire MB"]) == pytest.approx(wire_b / 1e6, abs=1e-3)
    assert int(d["wire bytes/step"]) == wire_a // 4 and int(t["wire bytes/step"]) == wire_b // 4
    assert float(d["wire vs first"]) == pytest.approx(1.0) and float(d["time vs first"]) == pytest.approx(1.0)
    assert float(t["wire vs first"]) == pytest.approx(wire_b / wire_a, abs=1e-3)
    assert float(t["time vs first"]) == pytest.approx(time_b / time_a, abs=1e-3)

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PNGS)
    assert "<table" in page and "<td>topk</td>" in page and "<td>dense</td>" in page
    assert "final val_loss" in page and "wire vs first" in page
    assert "report.html" in capsys.readouterr().out


def test_sparse_logging_extrapolates_totals(tmp_path):
    """With trainer.log_every=2 each line stands for two steps."""
    run = tmp_path / "sparse"
    os.makedirs(run)
    with open(run / "metrics.jsonl", "w") as fh:
        for step in (2, 4, 6):
            fh.write(json.dumps({"step": step, "loss": 1.0, "step_time_s": 0.1, "wire_bytes": 10,
                                 "dense_bytes": 20, "samples_per_s": 5.0}) + "\n")
        fh.write('{"step": 8, "loss"')  # a live run's half-written last line
    assert main([str(run), "--out", str(tmp_path / "rep")]) == 0
    row = md_rows(tmp_path / "rep" / "summary.md")["sparse"]
    assert row["steps"] == "6" and float(row["total time (s)"]) == pytest.approx(0.6)
    assert row["wire bytes/step"] == "10" and row["final val_loss"] == "-"


def test_sweep_directory_expands(tmp_path):
    sweep = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    for n, ratio in enumerate((1.0, 0.5, 0.25)):
        write_run(sweep / str(n), losses=[2.0, 1.5], step_time=[1.0, 1.0], wire=[int(1000 * ratio)] * 2,
                  overrides=["comm=topk", f"comm.ratio={ratio}", "trainer.max_steps=2"])
    os.makedirs(sweep / ".hydra")  # the sweep's own Hydra files are not a run
    out = tmp_path / "rep"
    assert main([str(tmp_path / "multirun"), "--out", str(out)]) == 0
    rows = md_rows(out / "summary.md")
    assert list(rows) == ["0", "1", "2"]
    assert [float(r["wire vs first"]) for r in rows.values()] == pytest.approx([1.0, 0.5, 0.25])
    assert rows["1"]["overrides"] == "comm.ratio=0.5"  # what the runs share is left out


def test_colliding_names_get_parent(tmp_path):
    for parent in ("a", "b"):
        write_run(tmp_path / parent / "run", losses=[1.0], step_time=[1.0], wire=[1])
    out = tmp_path / "rep"
    assert main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(out)]) == 0
    assert list(md_rows(out / "summary.md")) == ["a/run", "b/run"]


@pytest.mark.parametrize("empty", [False, True])
def test_missing_or_empty_metrics_exit_2(tmp_path, capsys, empty):
    write_run(tmp_path / "good", losses=[1.0], step_time=[1.0], wire=[1])
    bad = tmp_path / "bad"
    os.makedirs(bad)
    if empty:
        (bad / "metrics.jsonl").write_text("\n")
    assert main([str(tmp_path / "good"), str(bad), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("thinwire-report: error: ") and str(bad / "metrics.jsonl") in err
    assert not (tmp_path / "rep").exists()


def test_console_script_is_declared():
    from importlib import import_module

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    module, attr = scripts["thinwire-report"].split(":")
    assert getattr(import_module(module), attr) is main
