"""The command line: thinwire-train starts its own workers, or runs under torchrun; both
write metrics.jsonl with every key of the contract."""
import json
import sys

import pytest
import yaml

from conftest import run_cli

CONTRACT = {"step", "loss", "lr", "step_time_s", "comm_wait_s", "wire_bytes", "dense_bytes", "tokens_per_s"}


def check_metrics(run_dir, steps, nproc):
    with open(run_dir / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert CONTRACT <= r.keys(), CONTRACT - r.keys()
        assert r["wire_bytes"] >= r["dense_bytes"] > 0 if nproc > 1 else r["dense_bytes"] == 0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns
    return rows


@pytest.mark.extended  # ~10 s; the README quickstart (default tier) self-launches 2 workers too
@pytest.mark.slow
def test_self_launched_two_workers(tmp_path):
    p = run_cli("experiment=tiny", "trainer.max_steps=20", "trainer.eval_every=10", "dist.nproc=2",
                "trainer.sample_chars=40", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = check_metrics(tmp_path, 20, 2)
    # the exact fp32 all-reduce of this model plus 16 B of control traffic per step; the
    # evaluation's 16-byte reduction is reported on its own
    assert rows[5]["wire_bytes"] == rows[5]["dense_bytes"] + 16
    assert rows[9]["wire_bytes"] == rows[9]["dense_bytes"] + 16 and rows[9]["eval_bytes"] == 16
    assert "val_loss" in p.stdout and "sample:" in p.stdout


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """One ``torchrun --nproc_per_node=2`` launch, shared by the two torchrun tests below: 20
    steps without ``hydra.run.dir``, from an empty working directory, under a named
    rendezvous id (each launch costs a torchrun agent and two interpreters importing torch)."""
    cwd = tmp_path_factory.mktemp("torchrun")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--rdzv-id=job42", "-m", "thinwire.train"]
    p = run_cli("experiment=tiny", "trainer.max_steps=20", "trainer.eval_every=10", launcher=torchrun,
                cwd=str(cwd))
    return p, cwd


@pytest.mark.slow
def test_under_torchrun(torchrun_run):
    p, cwd = torchrun_run
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = (cwd / "outputs").iterdir()
    check_metrics(run_dir, 20, 2)
    assert (run_dir / "checkpoints" / "step_00000020" / "rank00001.pt").exists()


@pytest.mark.slow
def test_torchrun_default_run_dir_is_shared_by_ranks(torchrun_run):
    """Without hydra.run.dir every rank resolves the same directory from torchrun's run id."""
    p, cwd = torchrun_run
    assert p.returncode == 0, p.stderr[-3000:]
    run_dirs = list((cwd / "outputs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    ckpt = run_dirs[0] / "checkpoints" / "step_00000020"
    assert (ckpt / "rank00000.pt").exists() and (ckpt / "rank00001.pt").exists()


@pytest.mark.extended  # a CLI sweep: ~8 s; tests/test_readme.py trains a sweep on the pooled ranks
@pytest.mark.slow
def test_multirun_sweep_gives_one_run_dir_per_combination(tmp_path):
    p = run_cli("--multirun", "experiment=tiny", "trainer.max_steps=4", "trainer.eval_every=2",
                "comm=none,bf16", "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]  # logger=none in a sweep: no logger.group to set
    for n, comm in (("0", "none"), ("1", "bf16")):
        with open(tmp_path / n / "metrics.jsonl") as fh:
            assert [json.loads(line)["step"] for line in fh] == [1, 2, 3, 4]
        # what thinwire-report shows to tell the runs apart, as Hydra records it
        assert yaml.safe_load(open(tmp_path / n / ".hydra" / "overrides.yaml")) == \
            ["experiment=tiny", "trainer.max_steps=4", "trainer.eval_every=2", "logger=none", f"comm={comm}"]
    # bf16 halves the gradient bytes of the fp32 run (step 1: no eval; control traffic aside)
    first = [json.loads(line) for line in open(tmp_path / "0" / "metrics.jsonl")][0]
    second = [json.loads(line) for line in open(tmp_path / "1" / "metrics.jsonl")][0]
    assert first["control_bytes"] == second["control_bytes"] > 0
    assert second["wire_bytes"] - second["control_bytes"] == (first["wire_bytes"] - first["control_bytes"]) // 2
