"""engine=fsdp2: FSDP2 and HSDP under thinwire's loop (CPU, gloo, pooled ranks).

- sync=ddp at 2 ranks (FSDP2's reduce-scatter) equals engine=ddp, and resumes bitwise from
  its Distributed Checkpoint (DCP) files;
- sync=local (DiLoCo's outer Nesterov) across 2 islands of 2 ranks (HSDP layout, 4 ranks)
  equals a single-process reference that averages gradients inside each island, then
  pseudo-gradients across islands; a compressed outer average (int8) keeps the islands'
  ranks identical;
- diverged replicas are checkpointed per island: each island restores its own parameters
  (a world-wide DCP save would restore a mix);
- a crafted DCP metadata file is refused; impossible shapes exit 2 with one line.
"""
import json
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_ranks
from pool import POOLS

BASE = ["experiment=tiny", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
        "data.eval_batches=4", "dist.nproc=2", "optim.warmup_steps=2"]


def metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def dcp_params(path):
    """The model's whole tensors from a DCP directory, read in this one process (resharded)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(path) + ".pt"
    dcp_to_torch_save(str(path), out)
    return torch.load(out, weights_only=True)["model"]


def test_fsdp2_equals_ddp_and_resumes_bitwise_from_dcp(tmp_path):
    """2 ranks, AdamW, dropout: engine=fsdp2 sync=ddp gives engine=ddp's losses and
    parameters bitwise (no clipping: clip_grad_norm_ over shards adds the squares in another
    order); stopped after step 3 and resumed from its DCP checkpoint, it continues bitwise
    (every metric and every parameter)."""
    common = [*BASE, "model.dropout=0.1", "optim.grad_clip=0"]
    ddp = POOLS.train(*common, "engine=ddp", f"hydra.run.dir={tmp_path}/ddp")
    POOLS.train(*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/full")
    POOLS.train(*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/split", "trainer.stop_after=3")
    POOLS.train(*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/split", "trainer.resume=auto")
    a, b, d = metrics(tmp_path / "full"), metrics(tmp_path / "split"), metrics(tmp_path / "ddp")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "val_loss", "lr"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b] == [r.get(key) for r in d], key
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"
    assert (ckpt / "dcp" / ".metadata").exists() and "model" not in torch.load(ckpt / "common.pt", weights_only=True)
    full = dcp_params(ckpt / "dcp")
    split = dcp_params(tmp_path / "split" / "checkpoints" / "step_00000006" / "dcp")
    ref = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000006" / "common.pt", weights_only=True)["model"]
    for k, v in full.items():
        assert torch.equal(v, split[k]), k
        assert torch.equal(v, ref[k]), k
    assert set(full) <= set(ref) and "tok_emb.weight" in full
