"""optim=demo (DeMo / DisTrO): the chunked DCT, exact payload and wire bytes, equality with a
single-process reference that simulates p workers (fp64, written from the paper's
Algorithm 1), bitwise-equal ranks, bitwise resume, and skipped non-finite steps."""
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from conftest import run_ranks
from thinwire.comm.accounting import WireMeter
from thinwire.comm.compressors import build_compressor
from thinwire.comm.compressors.dct import DCTTiles, dct_basis, smaller_split
from thinwire.optim.demo import DeMoOptions, DeMoPlugin
from thinwire.optim.plugins import OptimConfig

SHAPES = [(84, 128), (128,), (7,), (3, 4, 10)]


def test_tile_sides_follow_the_largest_divisor_rule():
    assert [smaller_split(n, 64) for n in (128, 84, 65, 50, 64, 67, 4096, 1)] == [64, 42, 13, 50, 64, 1, 64, 1]
    t = DCTTiles((84, 128))
    assert (t.tile, t.grid, t.chunk, t.chunks) == ((42, 64), (2, 2), 2688, 4)
    t = DCTTiles((128,))
    assert (t.tile, t.chunk, t.chunks) == ((64,), 64, 2)
    t = DCTTiles((3, 4, 10))                      # viewed as (3, 40)
    assert (t.tile, t.chunks) == ((3, 40), 1)


def test_dct_is_orthonormal_dct_ii_and_round_trips():
    d = dct_basis(42).double()
    assert torch.allclose(d @ d.T, torch.eye(42, dtype=torch.float64), atol=1e-6)
    # a 2-D tile against the textbook double sum (orthonormal DCT-II along both axes)
    x = torch.randn(6, 8, dtype=torch.float64)
    i, j = torch.arange(6.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64)

    def basis(n, idx):
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        s = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
        s[0] = math.sqrt(1.0 / n)
        return s * torch.cos(math.pi * (2 * idx + 1) * k / (2 * n))

    want = basis(6, i) @ x @ basis(8, j).T
    got = DCTTiles((6, 8)).encode(x.float()).view(6, 8)
    assert torch.allclose(got.double(), want, atol=1e-5)
    for shape in [(84, 128), (128,), (3, 4, 10), (65, 9)]:
        t = DCTTiles(shape)
        y = torch.randn(shape)
        assert torch.allclose(t.decode(t.encode(y)), y, atol=1e-5)
    # chunks are tiles: the first chunk is the DCT of the top-left 42 x 64 tile only
    t = DCTTiles((84, 128))
    y = torch.zeros(84, 128)
    y[:42, :64] = torch.randn(42, 64)
    c = t.encode(y)
    assert c[0].abs().sum() > 0 and c[1:].abs().max() < 1e-6


def test_chunk_topk_sign_bits_decode_to_plus_minus_one():
    c = build_compressor("chunk_topk", chunk=64, k=8, bits=1)
    x = torch.randn(256)
    p = c.compress(x)
    assert set(p.tensors) == {"indices", "signs"} and p.tensors["signs"].numel() == 4 * 8 // 8
    y = c.decompress(p)
    nz = y != 0
    assert int(nz.sum()) == 32 and torch.equal(y[nz], torch.sign(x[nz]))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i, s in enumerate(SHAPES):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s) * 0.1))


def make_cfg(**kw):
    base = {**asdict(OptimConfig()), **asdict(DeMoOptions()), "name": "demo", "lr": 0.01, "weight_decay": 0.1,
            "schedule": "constant", "grad_clip": 0.0}
    base.update(kw)
    return SimpleNamespace(**base)


def grad_of(rank: int, step: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + len(shape) + shape[0])
    return torch.randn(shape, generator=g)


def payload_formula(shape, k, bits):
    """Bytes of one tensor's payload, from the layout rules alone."""
    t = DCTTiles(shape)
    if k >= t.chunk:
        return t.numel * 2 if bits == 16 else math.ceil(t.numel / 8)
    kept = t.chunks * k
    idx = math.ceil(kept * max(1, (t.chunk - 1).bit_length()) / 8)
    return idx + (kept * 2 if bits == 16 else math.ceil(kept / 8))


def _run_plugin(rank, world_size, steps, kw):
    torch.manual_seed(0)
    model = Toy()
    meter = WireMeter()
    plugin = DeMoPlugin(make_cfg(**kw), model, max_steps=100, meter=meter,
                        world=SimpleNamespace(rank=rank, world_size=world_size))
    wire = []
    for step in range(steps):
        for p, s in zip(plugin.params, SHAPES):
            p.grad = grad_of(rank, step, s)
        plugin.apply(step)
        wire.append(meter.take_step().get("data", 0))
    return {"params": [p.detach().clone() for p in plugin.params], "momentum": plugin.momentum_params(),
            "payload": plugin.payload_bytes(), "wire": wire}


def _both_variants(rank, world_size):
    return {bits: _run_plugin(rank, world_size, 3, {"bits": bits}) for bits in (16, 1)}


def reference(world_size, steps, bits, lr=0.01, wd=0.1, beta=0.999, k=32):
    """p workers in one process, fp64: Algorithm 1 of arXiv 2411.19870 with thinwire's choices
    (per-chunk top-k of the DCT of the momentum, mean over contributors, Signum)."""
    torch.manual_seed(0)
    params = [p.detach().double().clone() for p in Toy().parameters()]
    moms = [[torch.zeros_like(p) for p in params] for _ in range(world_size)]
    for step in range(steps):
        for i, (p, s) in enumerate(zip(params, SHAPES)):
            t = DCTTiles(s)
            view = t.view
            mats = [dct_basis(n).double() for n in t.tile]
            sums = torch.zeros(t.chunks, t.chunk, dtype=torch.float64)
            counts = torch.zeros_like(sums)
            for r in range(world_size):
                m = moms[r][i]
                m.mul_(beta).add_(grad_of(r, step, s).double(), alpha=lr)
                x = m.reshape(view)
                if len(view) == 1:
                    coef = x.view(t.grid[0], t.tile[0]) @ mats[0].T
                else:
                    tiles = x.view(t.grid[0], t.tile[0], t.grid[1], t.tile[1]).permute(0, 2, 1, 3)
                    coef = (mats[0] @ tiles @ mats[1].T).reshape(t.chunks, t.chunk)
                kk = min(k, t.chunk)
                idx = coef.abs().topk(kk, dim=1).indices
                kept = torch.zeros_like(coef).scatter_(1, idx, coef.gather(1, idx))
                sent = kept.gather(1, idx)
                wire = sent.to(torch.bfloat16).double() if bits == 16 else torch.where(sent < 0, -1.0, 1.0).double()
                sums.scatter_add_(1, idx, wire)
                counts.scatter_add_(1, idx, torch.ones_like(wire))
                m.sub_(_idct(kept, t, mats))           # full precision, whatever went on the wire
            q = sums / counts.clamp(min=1)                 # mean over the ranks that sent each one
            u = _idct(q, t, mats)
            if p.dim() >= 2:
                p.mul_(1 - lr * wd)
            p.sub_(lr * torch.sign(u))
    return params, moms


def _idct(c, t, mats):
    if len(t.view) == 1:
        return (c.view(t.grid[0], t.tile[0]) @ mats[0]).reshape(t.shape)
    tiles = mats[0].T @ c.reshape(t.grid[0], t.grid[1], t.tile[0], t.tile[1]) @ mats[1]
    return tiles.permute(0, 2, 1, 3).reshape(t.shape)


def test_two_ranks_match_the_reference_bytes_are_exact_and_ranks_stay_equal(tmp_path):
    out = run_ranks(_both_variants, 2, tmp_path)
    for bits in (16, 1):
        r0, r1 = out[0][bits], out[1][bits]
        for a, b in zip(r0["params"], r1["params"]):
            assert torch.equal(a, b)                     # bitwise equal on every rank
        params, moms = reference(2, 3, bits)
        for got, want in zip(r0["params"], params):
            assert torch.allclose(got.double(), want, atol=1e-6), bits
        for r in (0, 1):
            for got, want in zip(out[r][bits]["momentum"], moms[r]):
                assert torch.allclose(got.double(), want, atol=1e-6), bits
        want_payload = [payload_formula(s, 32, bits) for s in SHAPES]
        assert r0["payload"] == want_payload
        assert r0["wire"] == [sum(want_payload)] * 3     # all-gather: (p - 1) x the payload at p = 2
    # the numbers: 84x128 -> 4 tiles of 2688, 128 kept with 12-bit indices (192 B) + bf16 (256 B)
    assert out[0][16]["payload"][0] == 448 and out[0][1]["payload"][0] == 192 + 16


def test_config_rules():
    from thinwire.config import compose, validate
    from thinwire.errors import ConfigError

    validate(compose(["optim=demo"]))
    cfg = compose(["optim=distro"])
    assert (cfg.optim.name, cfg.optim.k, cfg.optim.bits, cfg.optim.beta) == ("demo", 4, 1, 0.995)
    for bad, msg in [(["comm=bf16"], "comm=none"), (["sync=local"], "sync=ddp"), (["optim.bits=2"], "bits"),
                     (["optim.update_rule=lion"], "update")]:
        with pytest.raises(ConfigError, match=msg):
            validate(compose(["optim=demo", *bad]))


TINY = ["experiment=tiny", "optim=demo", "trainer.max_steps=8", "trainer.eval_every=4", "model.dropout=0.1"]


def _losses(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [(r["step"], r["loss"], r.get("val_loss"), r["wire_bytes"]) for r in map(json.loads, fh)]


def _ckpt(run_dir, step, name):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / name, weights_only=False)


@pytest.mark.parametrize("extra", [[], ["optim=distro", "optim.update_rule=adamw"]], ids=["demo", "distro-adamw"])
def test_stop_and_resume_equals_uninterrupted_bitwise(pools, tmp_path, extra):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*TINY, *extra, "trainer.checkpoint_every=4", "dist.nproc=2"]
    pools.train(*args, f"hydra.run.dir={full}")
    pools.train(*args, f"hydra.run.dir={split}", "trainer.stop_after=5")
    run = pools.train(*args, f"hydra.run.dir={split}", "trainer.resume=auto")
    assert "at step 5" in run.stdout
    assert _losses(full) == _losses(split)
    for name in ("common.pt", "rank00000.pt", "rank00001.pt"):
        a, b = _ckpt(full, 8, name), _ckpt(split, 8, name)
        key = "model" if name == "common.pt" else "optim"
        assert set(a) >= {key} and a[key].keys() == b[key].keys()
        flat_a, flat_b = a[key].get("momentum", a[key]), b[key].get("momentum", b[key])
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (name, k)
    if extra:  # update_rule=adamw really steps AdamW (its state is checkpointed next to the momentum)
        assert "optimizer" in _ckpt(full, 8, "rank00000.pt")["optim"]
    # the momentum is per rank (each rank's shard holds its own) and differs between ranks
    m0, m1 = _ckpt(full, 8, "rank00000.pt")["optim"]["momentum"], _ckpt(full, 8, "rank00001.pt")["optim"]["momentum"]
    assert any(not torch.equal(m0[k], m1[k]) for k in m0)


def test_skipped_nonfinite_step_leaves_state_untouched(pools, tmp_path):
    pools.train(*TINY, "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.faults.nan_at=3",
                "trainer.faults.rank=1", "dist.nproc=2", f"hydra.run.dir={tmp_path}")
    rows = _losses(tmp_path)
    with open(tmp_path / "metrics.jsonl") as fh:
        assert [r["skipped_steps"] for r in map(json.loads, fh)] == [0, 0, 1, 1]
    assert rows[2][3] == 16                              # the skipped step sent only the control packet
    a, b = _ckpt(tmp_path, 2, "common.pt")["model"], _ckpt(tmp_path, 3, "common.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        ma = _ckpt(tmp_path, 2, f"rank{rank:05d}.pt")["optim"]["momentum"]
        mb = _ckpt(tmp_path, 3, f"rank{rank:05d}.pt")["optim"]["momentum"]
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
        assert all(torch.isfinite(v).all() for v in mb.values())
