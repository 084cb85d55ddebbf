"""The replica simulator (bench/harness/simulate.py: p rank threads in one process, collectives
as in-process math) against the real multi-rank path (gloo ranks, tests/pool.py): every logged
loss and val_loss bitwise equal, and the final parameters of every rank equal."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bench.harness import quality, simulate
from conftest import run_ranks
from thinwire.config import compose, validate

# dropout on: the simulator must keep each rank's global RNG stream its own
TINY = ["experiment=tiny", "trainer.max_steps=8", "trainer.eval_every=4", "trainer.checkpoint_every=8",
        "model.dropout=0.1", "dist.nproc=2"]
# SparseLoCo's preset with the tiny preset's model and run keys (experiment=tiny would replace it)
SPARSELOCO_TINY = ["experiment=sparseloco", "sync.local_steps=4", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
                   "data.batch_size=8", "optim.warmup_steps=5", "trainer.sample_chars=0", "trainer.progress=false",
                   "logger=none"]
KEYS = ("step", "loss", "val_loss", "grad_norm", "wire_bytes")


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def tensors(obj, prefix=""):
    """Every tensor in a checkpoint file's state, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def checkpoint(run_dir, step):
    """Every tensor of the step's checkpoint (model, optimizer, each rank's RNG, comm and sync state)."""
    d = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    return {f"{f}{k}": v for f in sorted(os.listdir(d)) if f.endswith(".pt")
            for k, v in tensors(torch.load(os.path.join(d, f), weights_only=False)).items()}


def simulated(*overrides):
    cfg = compose(list(overrides))
    validate(cfg)
    return simulate.run(cfg, threads=1)


def assert_same(real, sim, step):
    assert [[r.get(k) for k in KEYS] for r in rows(real)] == [[r.get(k) for k in KEYS] for r in rows(sim)]
    a, b = checkpoint(real, step), checkpoint(sim, step)
    assert a.keys() == b.keys() and any("model" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("case", [["sync=ddp", "comm=none"], ["sync=local", "sync.local_steps=4"]],
                         ids=["dense", "local"])
def test_simulator_equals_two_gloo_ranks_bitwise(pools, tmp_path, case):
    real, sim = str(tmp_path / "real"), str(tmp_path / "sim")
    pools.train(*TINY, *case, f"hydra.run.dir={real}")
    simulated(*TINY, *case, f"hydra.run.dir={sim}")
    assert_same(real, sim, 8)


@pytest.mark.extended  # four gloo ranks (a pool of its own); sums in gloo's ring order (simulate.ring_sum)
@pytest.mark.parametrize("case", [["sync=ddp", "comm=none"], ["sync=local", "sync.local_steps=4"],
                                  ["sync=diloco", "sync.local_steps=4"],
                                  SPARSELOCO_TINY,
                                  ["sync=local", "sync.local_steps=4", "sync.fragments=2", "sync.fragment_delay=1",
                                   "sync.fragment_alpha=0.5"]],
                         ids=["dense", "local", "diloco", "sparseloco", "streaming"])
def test_simulator_equals_four_gloo_ranks_bitwise(pools, tmp_path, case):
    tiny = TINY[1:] if case is SPARSELOCO_TINY else TINY  # one experiment= only: the last would win
    args = [*case, *tiny, "dist.nproc=4", "trainer.max_steps=16", "trainer.checkpoint_every=16"]
    real, sim = str(tmp_path / "real"), str(tmp_path / "sim")
    pools.train(*args, f"hydra.run.dir={real}")
    simulated(*args, f"hydra.run.dir={sim}")
    assert_same(real, sim, 16)


def spread(rank, n):
    """Values whose sum depends on the order of addition (magnitudes spread over about e^12)."""
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)).float()


def gloo_sum(rank, world_size, n):
    x = spread(rank, n)
    torch.distributed.all_reduce(x)
    return x


@pytest.mark.extended  # four gloo ranks
@pytest.mark.parametrize("n", [1003, 100_000])
def test_ring_sum_adds_in_gloo_order(tmp_path, n):
    """gloo's all-reduce over four ranks equals ring_sum bitwise, and differs from the plain
    rank-order sum (so the order is really tested)."""
    real = run_ranks(gloo_sum, 4, tmp_path, n)[0]
    xs = [spread(r, n) for r in range(4)]
    plain = xs[0] + xs[1] + xs[2] + xs[3]
    assert torch.equal(simulate.ring_sum(xs), real) and not torch.equal(plain, real)


@pytest.mark.parametrize("row", ["sync=co2", "optim=demo", "optim=adam1bit"])
def test_rows_it_cannot_model_are_refused_in_one_line(row):
    cfg = compose(["experiment=tiny", "dist.nproc=2", row])
    why = simulate.refusal(cfg)
    assert why is not None and "\n" not in why and row in why
    with pytest.raises(SystemExit, match=row):
        simulate.run(cfg)


def test_quality_refuses_a_row_it_cannot_simulate_with_exit_2(capsys, tmp_path):
    assert quality.main(["--simulate", "--rows", "co2 H=8", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sync=co2" in err and "'co2 H=8'" in err
