"""Resumption: a run stopped with trainer.stop_after and resumed with trainer.resume=auto
equals the uninterrupted run bitwise on CPU (per-step losses and final parameters), at
world size 1 and 2, with a small bucket_cap_mb so DDP has several buckets, and dropout
on so the RNG state matters."""
import json

import pytest
import torch

from conftest import run_cli

COMMON = ["experiment=tiny", "trainer.max_steps=24", "trainer.checkpoint_every=8", "trainer.eval_every=12",
          "model.dropout=0.1", "engine.bucket_cap_mb=0.05"]


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, fh)]


def final_params(run_dir, step=24):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "common.pt", weights_only=False)["model"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_stop_and_resume_equals_uninterrupted_bitwise(tmp_path, nproc):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*COMMON, f"dist.nproc={nproc}"]
    p = run_cli(*args, f"hydra.run.dir={full}")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(*args, f"hydra.run.dir={split}", "trainer.stop_after=13")  # stops between checkpoints
    assert p.returncode == 0, p.stderr[-3000:]
    assert (split / "checkpoints" / "step_00000013" / "COMPLETE").exists()
    assert not (split / "checkpoints" / "step_00000024").exists()
    p = run_cli(*args, f"hydra.run.dir={split}", "trainer.resume=auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 13" in p.stdout

    assert losses(full) == losses(split)  # the same floats, step by step, evals included
    a, b = final_params(full), final_params(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
