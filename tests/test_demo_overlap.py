"""optim=demo optim.overlap=true (Psyche's look-ahead): equality with a single-process fp64
reference of the same delayed math (p workers simulated in one process: each worker's gradient
at its own look-ahead point, the mean update applied one step late, the last one at once),
bitwise-equal ranks at every step boundary, the same bytes as without overlap, bitwise resume
with a gather in flight, and a skipped step that leaves the update in flight untouched."""
import json

import torch

from conftest import run_ranks
from test_demo import SHAPES, TINY, Toy, _ckpt, _idct, _losses, grad_of, make_cfg
from thinwire.comm.accounting import WireMeter
from thinwire.comm.compressors.dct import DCTTiles, dct_basis
from thinwire.optim.demo import DeMoPlugin

STEPS, CURV = 4, 0.5     # loss_r = <g_r(step), x> + CURV/2 |x|^2: the gradient depends on where it is taken


def _loss(rank, step, params):
    return sum((grad_of(rank, step, s) * p).sum() + 0.5 * CURV * (p * p).sum() for s, p in zip(SHAPES, params))


def _run(rank, world_size, overlap):
    torch.manual_seed(0)
    meter = WireMeter()
    plugin = DeMoPlugin(make_cfg(overlap=overlap), Toy(), max_steps=STEPS, meter=meter,
                        world=type("W", (), {"rank": rank, "world_size": world_size, "async_group": None})())
    params, wire = [], []
    for step in range(STEPS):
        plugin.compute(lambda: _loss(rank, step, plugin.params), {})
        plugin.apply(step)
        wire.append(meter.take_step().get("data", 0))
        params.append([p.detach().clone() for p in plugin.params])
    return {"params": params, "wire": wire}


def _both(rank, world_size):
    return {ov: _run(rank, world_size, ov) for ov in (False, True)}


def _select(m, t, mats, k=32):
    """Top-k DCT coefficients of every chunk of m (fp64): (kept coefficients, indices, bf16 wire values)."""
    x = m.reshape(t.view)
    if len(t.view) == 1:
        coef = x.view(t.grid[0], t.tile[0]) @ mats[0].T
    else:
        tiles = x.view(t.grid[0], t.tile[0], t.grid[1], t.tile[1]).permute(0, 2, 1, 3)
        coef = (mats[0] @ tiles @ mats[1].T).reshape(t.chunks, t.chunk)
    idx = coef.abs().topk(min(k, t.chunk), dim=1).indices
    kept = torch.zeros_like(coef).scatter_(1, idx, coef.gather(1, idx))
    return kept, idx, kept.gather(1, idx).to(torch.bfloat16).double()


def reference(world_size, lr=0.01, wd=0.1, beta=0.999):
    """The delayed math of thinwire/optim/demo_overlap.py, written out for p workers in fp64:
    worker r takes its gradient at x - lr sign(m_r) (its momentum before its own sent
    coefficients left it, from the previous step), then x gets the previous step's mean update,
    then every worker folds in its gradient and selects; the last step's update lands at once."""
    torch.manual_seed(0)
    x = [p.detach().double().clone() for p in Toy().parameters()]
    moms = [[torch.zeros_like(p) for p in x] for _ in range(world_size)]
    ahead = [None] * world_size                     # sign(m_r) of the previous step
    pending, history = None, []
    for step in range(STEPS):
        grads = []
        for r in range(world_size):
            seen = [p - lr * a for p, a in zip(x, ahead[r])] if ahead[r] is not None else x
            seen = [p.clone().requires_grad_(True) for p in seen]
            _loss(r, step, seen).backward()
            grads.append([p.grad for p in seen])
        updates = [pending] if pending is not None else []
        mean = []
        for i, s in enumerate(SHAPES):
            t = DCTTiles(s)
            mats = [dct_basis(n).double() for n in t.tile]
            sums = torch.zeros(t.chunks, t.chunk, dtype=torch.float64)
            counts = torch.zeros_like(sums)
            for r in range(world_size):
                m = moms[r][i]
                m.mul_(beta).add_(grads[r][i], alpha=lr)
                if i == 0:
                    ahead[r] = []
                ahead[r].append(torch.sign(m))
                kept, idx, wire = _select(m, t, mats)
                sums.scatter_add_(1, idx, wire)
                counts.scatter_add_(1, idx, torch.ones_like(wire))
                m.sub_(_idct(kept, t, mats))
            mean.append(_idct(sums / counts.clamp(min=1), t, mats))
        pending = mean
        if step == STEPS - 1:
            updates.append(pending)
        for u in updates:
            for i, p in enumerate(x):
                if p.dim() >= 2:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * torch.sign(u[i]))
        history.append([p.clone() for p in x])
    return history


def test_two_ranks_match_the_delayed_reference_with_the_same_bytes(tmp_path):
    out = run_ranks(_both, 2, tmp_path)
    want = reference(2)
    for step in range(STEPS):
        for a, b in zip(out[0][True]["params"][step], out[1][True]["params"][step]):
            assert torch.equal(a, b)                        # the consensus x, bitwise, at every boundary
        for got, ref in zip(out[0][True]["params"][step], want[step]):
            assert torch.allclose(got.double(), ref, atol=1e-6), step
    # the look-ahead run is a different trajectory from the synchronous one, same bytes every step
    assert not all(torch.equal(a, b) for a, b in zip(out[0][True]["params"][-1], out[0][False]["params"][-1]))
    assert out[0][True]["wire"] == out[0][False]["wire"] and out[0][True]["wire"][0] > 0


def test_stop_and_resume_with_a_gather_in_flight_equals_uninterrupted_bitwise(pools, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*TINY, "optim.overlap=true", "trainer.checkpoint_every=4", "dist.nproc=2"]
    pools.train(*args, f"hydra.run.dir={full}")
    pools.train(*args, f"hydra.run.dir={split}", "trainer.stop_after=5")
    run = pools.train(*args, f"hydra.run.dir={split}", "trainer.resume=auto")
    assert "at step 5" in run.stdout
    assert _losses(full) == _losses(split)
    a, b = _ckpt(full, 8, "common.pt")["model"], _ckpt(split, 8, "common.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = _ckpt(split, 5, "rank00001.pt")["optim"]["lookahead"]
    assert saved["pending"] is not None and saved["lr"] > 0   # step 5's update was in flight at the stop
    for rank in (0, 1):
        x, y = (_ckpt(d, 8, f"rank{rank:05d}.pt")["optim"] for d in (full, split))
        assert all(torch.equal(x["momentum"][k], y["momentum"][k]) for k in x["momentum"])
        assert all(torch.equal(x["lookahead"]["direction"][k], y["lookahead"]["direction"][k])
                   for k in x["lookahead"]["direction"])
    with open(full / "metrics.jsonl") as fh:
        rows = list(map(json.loads, fh))
    assert all(r["gather_s"] >= r["gather_wait_s"] >= 0 for r in rows)


def test_skipped_step_keeps_the_update_in_flight(pools, tmp_path):
    pools.train(*TINY, "optim.overlap=true", "trainer.max_steps=4", "trainer.checkpoint_every=1",
                "trainer.faults.nan_at=3", "trainer.faults.rank=1", "dist.nproc=2", f"hydra.run.dir={tmp_path}")
    a, b = _ckpt(tmp_path, 2, "common.pt")["model"], _ckpt(tmp_path, 3, "common.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        x, y = (_ckpt(tmp_path, s, f"rank{rank:05d}.pt")["optim"] for s in (2, 3))
        assert x["lookahead"]["pending"] is not None
        for key in ("pending", "direction"):
            assert all(torch.equal(x["lookahead"][key][k], y["lookahead"][key][k]) for k in x["lookahead"][key])
        assert all(torch.equal(x["momentum"][k], y["momentum"][k]) for k in x["momentum"])


def test_overlap_needs_the_signum_rule():
    import pytest

    from thinwire.config import compose, validate
    from thinwire.errors import ConfigError

    assert compose(["optim=demo", "optim.overlap=true"]).optim.overlap is True
    with pytest.raises(ConfigError, match="overlap"):
        validate(compose(["optim=demo", "optim.overlap=true", "optim.update_rule=adamw"]))
