"""Resumption: a run stopped with trainer.stop_after and resumed with trainer.resume=auto
equals the uninterrupted run bitwise on CPU (per-step losses and final parameters), at
world size 1 and 2, with a small bucket_cap_mb so DDP has several buckets, and dropout
on so the RNG state matters."""
import json

import pytest
import torch


COMMON = ["experiment=tiny", "trainer.max_steps=24", "trainer.checkpoint_every=8", "trainer.eval_every=12",
          "model.dropout=0.1", "engine.bucket_cap_mb=0.05"]


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, fh)]


def final_params(run_dir, step=24):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "common.pt", weights_only=False)["model"]


COMPRESSED = {
    "topk-ef": ["comm=topk", "comm.ratio=0.05", "comm.feedback=ef", "comm.min_numel=256"],
    "topk-ef21": ["comm=topk", "comm.ratio=0.05", "comm.feedback=ef21", "comm.min_numel=256"],
    "randk-econtrol": ["comm=randk", "comm.ratio=0.05", "comm.feedback=econtrol", "comm.min_numel=256"],
    "sign1-ef-two-phase": ["comm=sign1", "comm.feedback=ef", "comm.block_size=256", "comm.min_numel=256"],
}
# the default tier resumes 2 ranks plain and with sign1 + ef through the two-phase collective
# (feedback buffers and server-side errors both restored); the extended tier the others
DEFAULT_TIER = {"ws2", "ws2-sign1-ef-two-phase"}
IDS = ["ws1", "ws2"] + [f"ws2-{k}" for k in COMPRESSED]
CASES = [pytest.param(n, c, id=i, marks=() if i in DEFAULT_TIER else pytest.mark.extended)
         for (n, c), i in zip([(1, []), (2, [])] + [(2, v) for v in COMPRESSED.values()], IDS)]


@pytest.mark.parametrize("nproc,comm", CASES)
def test_stop_and_resume_equals_uninterrupted_bitwise(pools, tmp_path, nproc, comm):
    """Compressed cases: error-feedback buffers (and sign1's server-side errors) must come
    back exactly, and layer-wise compression must not depend on DDP's bucket layout,
    which differs on the first step after a restart."""
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*COMMON, f"dist.nproc={nproc}", *comm]
    pools.train(*args, f"hydra.run.dir={full}")
    pools.train(*args, f"hydra.run.dir={split}", "trainer.stop_after=13")  # stops between checkpoints
    assert (split / "checkpoints" / "step_00000013" / "COMPLETE").exists()
    assert not (split / "checkpoints" / "step_00000024").exists()
    run = pools.train(*args, f"hydra.run.dir={split}", "trainer.resume=auto")
    assert "resumed from" in run.stdout and "at step 13" in run.stdout

    assert losses(full) == losses(split)  # the same floats, step by step, evals included
    a, b = final_params(full), final_params(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
