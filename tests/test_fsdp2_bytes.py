"""Bytes under ``engine=fsdp2``: FSDP2's all-gathers and reduce-scatters inside an island are
accounted from the sharded parameters (``island_step_bytes``) and reported as
``island_bytes``, never in ``wire_bytes``; ``dense_bytes`` is the all-reduce of this rank's
shard across the R replicas.

- a hand count on three small tensors (uneven dim 0, a dim 0 shorter than S, mixed precision);
- the accounted count equals what FSDP2's own collectives take as input on 2 pooled ranks
  (``dist.all_gather_single`` / ``dist.reduce_scatter_single`` wrapped to record it), with
  and without ``reshard_after_forward`` and with bf16 compute;
- through the trainer (extended): 2 ranks, one island: ``island_bytes`` per step is the
  accounted count of the model, ``wire_bytes`` is the control traffic alone, ``dense_bytes`` 0.
"""
import json

import pytest
import torch

from conftest import run_ranks
from pool import POOLS
from thinwire.comm.accounting import ByteCounts, collective_bytes
from thinwire.trainer.fsdp2_engine import island_step_bytes


def test_island_bytes_by_hand():
    params = [torch.empty(5, 3), torch.empty(4), torch.empty(1, 2)]
    # S = 2: shards of ceil(5/2) = 3 rows x 3 = 9, 2 and 1 row x 2 = 2 elements (FSDP2 pads dim 0).
    # all-gather: each rank sends its shard to the other one: (2 - 1) x 13 x 4 bytes = 52, in
    # forward and again in backward; reduce-scatter of the padded 26-element gradient: 1/2 x 26 x 4 = 52
    assert island_step_bytes(params, 2, True, None, None) == {"all_gather": 104, "reduce_scatter": 52}
    assert island_step_bytes(params, 2, False, None, None) == {"all_gather": 52, "reduce_scatter": 52}
    # bf16 compute: the gathers halve; the reduction follows param_dtype unless reduce_dtype is given
    assert island_step_bytes(params, 2, True, torch.bfloat16, None) == {"all_gather": 52, "reduce_scatter": 26}
    assert island_step_bytes(params, 2, True, torch.bfloat16, torch.float32) == {"all_gather": 52,
                                                                                "reduce_scatter": 52}
    # S = 4: shards of 2 x 3 = 6, 1 and 1 x 2 (a rank holds padding only) = 9 elements:
    # gather 3 x 9 x 4 = 108 per pass, reduce-scatter 3/4 x 36 x 4 = 108
    assert island_step_bytes(params, 4, True, None, None) == {"all_gather": 216, "reduce_scatter": 108}
    assert island_step_bytes(params, 1, True, None, None) == {"all_gather": 0, "reduce_scatter": 0}
    counts = ByteCounts.of({"data": 10, "control": 3, "island": 156})
    assert counts.island == 156 and counts.wire == 13 and counts.as_dict()["island_bytes"] == 156


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 6)                      # 7 rows: shards of 4 and 3
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)])
        self.head = torch.nn.Linear(6, 3)                        # 3 rows: shards of 2 and 1

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(h)


def fsdp2_collective_bytes(rank, world_size, reshard, param_dtype):
    """Accounted and recorded island bytes of one forward + backward of ``Tiny`` under
    fully_shard per block then the root (as the engine wraps), on a 1-D mesh of the world."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = Tiny()
    dtype = {"bf16": torch.bfloat16}.get(param_dtype)
    kw = {"mesh": init_device_mesh("cpu", (world_size,)), "reshard_after_forward": reshard,
          "mp_policy": MixedPrecisionPolicy(param_dtype=dtype)}
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    accounted = island_step_bytes(list(model.parameters()), world_size, reshard, dtype, None)
    seen = {"all_gather": 0, "reduce_scatter": 0}
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def recorded_gather(*args, **kwargs):
        x = kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]
        seen["all_gather"] += collective_bytes("all_gather", x.numel(), x.element_size(), world_size)
        return gather(*args, **kwargs)

    def recorded_scatter(*args, **kwargs):
        x = kwargs["input"] if "input" in kwargs else args[1]
        seen["reduce_scatter"] += collective_bytes("reduce_scatter", x.numel(), x.element_size(), world_size)
        return scatter(*args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = recorded_gather, recorded_scatter
    try:
        model(torch.tensor([[1, 2, 6, 0]])).float().pow(2).sum().backward()
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = gather, scatter
    return accounted, seen


def test_island_bytes_equal_fsdp2s_own_collectives(tmp_path):
    for reshard, param_dtype in ((True, None), (False, None), (True, "bf16")):
        results = run_ranks(fsdp2_collective_bytes, 2, tmp_path, reshard, param_dtype)
        for accounted, seen in results:
            assert seen["all_gather"] > 0 and seen["reduce_scatter"] > 0
            assert accounted == seen, (reshard, param_dtype, accounted, seen)


@pytest.mark.extended
def test_trainer_reports_island_bytes_apart_from_wire_bytes(tmp_path):
    """2 ranks, one island of 2 (R = 1), sync=ddp: island_bytes every step = the accounted
    gathers and reduce-scatters of the tiny model; wire_bytes = control_bytes (nothing crosses
    islands); dense_bytes = 0 (one replica). With comm=topk (error feedback on each local
    shard: of the gradient every step, or of the pseudo-gradient under sync=local),
    residual_norm is the norm of the whole residuals: both ranks' saved shards together."""
    import math

    from hydra.utils import instantiate

    from thinwire.config import compose

    overrides = ["experiment=tiny", "trainer.max_steps=2", "trainer.eval_every=1000", "data.eval_batches=4",
                 "dist.nproc=2", "engine=fsdp2"]
    POOLS.train(*overrides, f"hydra.run.dir={tmp_path}/run")
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    cfg = compose(overrides)
    model = instantiate(cfg.model, info=instantiate(cfg.data, seed=0, rank=0, world_size=2).info)
    want = sum(island_step_bytes([p for p in model.parameters() if p.requires_grad], 2, True, None, None).values())
    assert want > 0
    for r in rows:
        assert r["island_bytes"] == want, (r["island_bytes"], want)
        assert r["wire_bytes"] == r["control_bytes"] and r["dense_bytes"] == 0
    # per-step compression (sync=ddp) and the outer average (sync=local, H = 2): the saved residuals
    for name, extra, where in (("topk", [], ("comm", "aggregator")), ("local", LOCAL, ("sync", "averager"))):
        POOLS.train(*overrides, "comm=topk", *extra, f"hydra.run.dir={tmp_path}/{name}")
        with open(tmp_path / name / "metrics.jsonl") as fh:
            last = [json.loads(line) for line in fh][-1]
        sq = []
        for r in range(2):
            state = torch.load(tmp_path / name / "checkpoints" / "step_00000002" / f"rank{r:05d}.pt", weights_only=True)
            feedback = state[where[0]][where[1]]["feedback"]
            sq.append(sum(float(v["e"].double().pow(2).sum()) for v in feedback.values()))
        assert min(sq) > 0, name
        assert last["residual_norm"] == pytest.approx(math.sqrt(sum(sq)), rel=1e-12), name
        assert last["residual_norm"] > math.sqrt(max(sq)) * (1 + 1e-6), name  # more than one rank's shard


LOCAL = ["sync=local", "sync.local_steps=1", "comm.warmup_steps=0"]
