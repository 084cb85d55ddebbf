"""optim=adam1bit (1-bit Adam): the warm-up equals torch's AdamW on the mean gradient, the
compression stage equals a single-process reference that simulates p workers (written from
Algorithm 1 of arXiv 2102.02888 and the two-phase collective's rules), every rank holds the
same momentum, exact bytes of both phases, bitwise resume across the freeze, skipped steps."""
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from conftest import run_ranks
from thinwire.comm.accounting import WireMeter
from thinwire.optim.adam1bit import OneBitAdamOptions, OneBitAdamPlugin, dense_count, dense_step
from thinwire.optim.plugins import OptimConfig

SHAPES = [(84, 128), (128,), (7,), (3, 4, 10)]
STEPS, FREEZE, P = 5, 2, 2


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i, s in enumerate(SHAPES):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s) * 0.1))


def make_cfg(**kw):
    base = {**asdict(OptimConfig()), **asdict(OneBitAdamOptions()), "name": "adam1bit", "lr": 0.01,
            "weight_decay": 0.1, "schedule": "constant", "grad_clip": 0.0, "freeze_step": FREEZE,
            "warmup_comm": "fp32", "block_size": 32}
    base.update(kw)
    return SimpleNamespace(**base)


def grad_of(rank: int, step: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + len(shape) + shape[0])
    return torch.randn(shape, generator=g)


def _run(rank, world_size, kw):
    torch.manual_seed(0)
    meter = WireMeter()
    plugin = OneBitAdamPlugin(make_cfg(**kw), Toy(), max_steps=100, meter=meter,
                              world=SimpleNamespace(rank=rank, world_size=world_size, async_group=None))
    wire, params = [], []
    for step in range(STEPS):
        for p, s in zip(plugin.params, SHAPES):
            p.grad = grad_of(rank, step, s)
        plugin.apply(step)
        wire.append(meter.take_step().get("data", 0))
        params.append([p.detach().clone() for p in plugin.params])
    return {"params": params, "m": [m.clone() for m in plugin.exp_avg], "wire": wire}


def _variants(rank, world_size):
    return {w: _run(rank, world_size, {"warmup_comm": w}) for w in ("fp32", "bf16", "int8")}


def sign1(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Scaled sign per block of bs values: mean |x| of the block times sign(x), sign(0) = +1."""
    out = torch.empty_like(x)
    for a in range(0, x.numel(), bs):
        b = x[a:a + bs]
        out[a:a + bs] = torch.where(b < 0, -1.0, 1.0) * b.abs().mean()
    return out


def reference(world_size, lr=0.01, wd=0.1, b1=0.9, b2=0.95, eps=1e-8, bs=32, refresh=()):
    """Warm-up: torch.optim.AdamW on the mean gradient. Then, per tensor: every worker's local
    momentum b1 m + (1 - b1) g_i plus its worker error is padded to p chunks of c (ceil(n/p)
    rounded up to 8), each chunk sign-compressed; owner j averages the p copies of chunk j,
    adds its server error and sign-compresses again; everyone gets the concatenation. Steps in
    ``refresh`` (after the warm-up) are Adam steps on the mean gradient again, v included."""
    torch.manual_seed(0)
    params = [p.detach().clone().requires_grad_(True) for p in Toy().parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(b1, b2), eps=eps)
    history = []
    for step in range(FREEZE):
        for p, s in zip(params, SHAPES):
            p.grad = sum(grad_of(r, step, s) for r in range(world_size)) / world_size
        opt.step()
        history.append([p.detach().clone() for p in params])
    m = [opt.state[p]["exp_avg"].clone() for p in params]
    v = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    x = [p.detach().clone() for p in params]
    werr = [[torch.zeros(p.numel()) for p in params] for _ in range(world_size)]
    serr = [[None] * len(params) for _ in range(world_size)]
    n_var = FREEZE
    for step in range(FREEZE, STEPS):
        t = step + 1
        n_var += step in refresh
        for i, s in enumerate(SHAPES):
            if step in refresh:
                g = sum(grad_of(r, step, s) for r in range(world_size)) / world_size
                m[i] = m[i] * b1 + g * (1 - b1)
                v[i] = v[i] * b2 + g * g * (1 - b2)
                _adam_step(x, m, v, i, lr, wd, b1, b2, eps, t, n_var)
                continue
            n = x[i].numel()
            c = max(8, -(-(-(-n // world_size)) // 8) * 8)
            sent = []
            for r in range(world_size):
                q = (m[i].reshape(-1) * b1 + grad_of(r, step, s).reshape(-1) * (1 - b1)) + werr[r][i]
                padded = torch.zeros(world_size * c)
                padded[:n] = q
                comp = torch.cat([sign1(padded[j * c:(j + 1) * c], bs) for j in range(world_size)])
                werr[r][i] = q - comp[:n]
                sent.append(comp)
            chunks = []
            for j in range(world_size):
                avg = sum(sent[r][j * c:(j + 1) * c] for r in range(world_size)) / world_size
                if serr[j][i] is not None:
                    avg = avg + serr[j][i]
                out = sign1(avg, bs)
                serr[j][i] = avg - out
                chunks.append(out)
            m[i] = torch.cat(chunks)[:n].view(s)
            _adam_step(x, m, v, i, lr, wd, b1, b2, eps, t, n_var)
        history.append([xi.clone() for xi in x])
    return history, m


def _adam_step(x, m, v, i, lr, wd, b1, b2, eps, t, n_var):
    if x[i].dim() >= 2:
        x[i] = x[i] * (1 - lr * wd)
    denom = v[i].sqrt() / math.sqrt(1 - b2 ** n_var) + eps
    x[i] = x[i] - lr / (1 - b1 ** t) * m[i] / denom


def _chunk_bytes(n, p, bs):
    c = max(8, -(-(-(-n // p)) // 8) * 8)
    return c // 8 + 4 * -(-c // bs)


def test_two_ranks_match_adamw_then_the_reference_bytes_are_exact(tmp_path):
    out = run_ranks(_variants, P, tmp_path)
    r0, r1 = out[0]["fp32"], out[1]["fp32"]
    for step in range(STEPS):                                       # bitwise the same on every rank
        assert all(torch.equal(a, b) for a, b in zip(r0["params"][step], r1["params"][step]))
    assert all(torch.equal(a, b) for a, b in zip(r0["m"], r1["m"]))
    history, m = reference(P)
    for step in range(STEPS):
        for got, want in zip(r0["params"][step], history[step]):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), step
    for got, want in zip(r0["m"], m):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    n = sum(math.prod(s) for s in SHAPES)
    sign_phase = 2 * (P - 1) * sum(_chunk_bytes(math.prod(s), P, 32) for s in SHAPES)
    # chunks of 5376, 64, 8, 64 values: sign bytes 672 + 8 + 1 + 8, fp32 scales per 32 values 672 + 8 + 4 + 8
    assert sign_phase == 2 * (1344 + 16 + 5 + 16)
    assert r0["wire"] == [4 * n] * FREEZE + [sign_phase] * (STEPS - FREEZE)          # fp32 ring at p=2: 4 B/param
    assert out[0]["bf16"]["wire"] == [2 * n] * FREEZE + [sign_phase] * (STEPS - FREEZE)
    # int8 warm-up, two-phase: 2 (p-1) x (c one-byte codes + an fp32 scale per 32) per tensor
    int8 = 2 * (P - 1) * sum(c + 4 * -(-c // 32) for c in (max(8, -(-(-(-math.prod(s) // P)) // 8) * 8)
                                                           for s in SHAPES))
    assert int8 == 2 * (5376 + 672 + 64 + 8 + 8 + 4 + 64 + 8)
    assert out[0]["int8"]["wire"] == [int8] * FREEZE + [sign_phase] * (STEPS - FREEZE)
    assert all(torch.equal(a, b) for a, b in zip(out[0]["int8"]["params"][-1], out[1]["int8"]["params"][-1]))


def deepspeed_var_steps(kappa: int, steps: int) -> list[int]:
    """0-based steps that update the variance under DeepSpeed ZeroOneAdam's counters (step is
    1-based there: update when step % var_interval == 0; the interval doubles after kappa updates)."""
    out, interval, counter = [], 1, 0
    for step in range(1, steps + 1):
        if step % interval == 0:
            out.append(step - 1)
            counter += 1
            if counter == kappa:
                counter, interval = 0, interval * 2
    return out


def test_variance_refreshes_follow_zero_one_adams_schedule():
    for kappa in (1, 3, 6, 16):   # freeze_step = kappa: exactly 0/1 Adam's T_v
        assert [t for t in range(1500) if dense_step(t, kappa, kappa)] == deepspeed_var_steps(kappa, 1500)
    assert [t for t in range(40) if dense_step(t, 24, 3)] == [*range(24), 25, 27, 29, 31, 35, 39]
    assert [t for t in range(100) if dense_step(t, 48, 0)] == [*range(48)]
    assert dense_count(1200, 24, 3) == 46     # the harness row: <= 1/10 of bf16 over 1200 steps at p = 4
    capped = [t + 1 for t in range(200) if dense_step(t, 2, 2, max_interval=8)]   # 1-based steps
    assert capped == [1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, *range(56, 201, 8)]


def _refresh(rank, world_size):
    return _run(rank, world_size, {"var_update_scaler": 1})


def test_variance_refreshes_match_the_reference_and_send_dense_bytes(tmp_path):
    out = run_ranks(_refresh, P, tmp_path)
    assert [dense_step(t, FREEZE, 1) for t in range(STEPS)] == [True, True, False, True, False]  # n = 4: 4 % 2
    history, m = reference(P, refresh={3})
    for step in range(STEPS):
        assert all(torch.equal(a, b) for a, b in zip(out[0]["params"][step], out[1]["params"][step]))
        for got, want in zip(out[0]["params"][step], history[step]):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), step
    n = sum(math.prod(s) for s in SHAPES)
    sign_phase = 2 * (1344 + 16 + 5 + 16)
    assert out[0]["wire"] == [4 * n, 4 * n, sign_phase, 4 * n, sign_phase]


def test_config_rules():
    from thinwire.config import compose, validate
    from thinwire.errors import ConfigError

    validate(compose(["optim=adam1bit"]))
    for bad, msg in [(["comm=sign1"], "comm=none"), (["sync=local"], "sync=ddp"), (["optim.freeze_step=0"], "freeze_step"),
                     (["optim.freeze_step=1"], r"^optim\.freeze_step=1: diverges"),
                     (["optim.compressor=topk"], "compressor"), (["optim.warmup_comm=fp16"], "warmup_comm"),
                     (["optim.var_update_scaler=-1"], "var_update_scaler"),
                     (["engine=deepspeed"], "ZeRO partitions the optimizer state")]:
        with pytest.raises(ConfigError, match=msg):
            validate(compose(["optim=adam1bit", *bad]))


TINY = ["experiment=tiny", "optim=adam1bit", "optim.freeze_step=3", "trainer.max_steps=8", "trainer.eval_every=4",
        "model.dropout=0.1", "dist.nproc=2"]


def _rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return list(map(json.loads, fh))


def _optim(run_dir, step, rank):
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    return torch.load(d / f"rank{rank:05d}.pt", weights_only=False)["optim"]


def _flat(state):
    out = {"t": torch.tensor(state["t"])}
    for key in ("exp_avg", "exp_avg_sq"):
        out.update({f"{key}.{n}": v for n, v in state[key].items()})
    for n, bufs in state["errors"]["feedback"].items():
        out.update({f"e.{n}.{k}": v for k, v in bufs.items()})
    out.update({f"server.{n}": v for n, v in state["errors"]["server_errors"].items()})
    return out


def test_stop_and_resume_across_the_freeze_equals_uninterrupted_bitwise(pools, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*TINY, "trainer.checkpoint_every=4"]
    pools.train(*args, f"hydra.run.dir={full}")
    pools.train(*args, f"hydra.run.dir={split}", "trainer.stop_after=5")
    run = pools.train(*args, f"hydra.run.dir={split}", "trainer.resume=auto")
    assert "at step 5" in run.stdout
    key = ("step", "loss", "val_loss", "wire_bytes", "variance_frozen")
    assert [[r.get(k) for k in key] for r in _rows(full)] == [[r.get(k) for k in key] for r in _rows(split)]
    assert [r["variance_frozen"] for r in _rows(full)] == [0, 0, 0, 1, 1, 1, 1, 1]
    for rank in (0, 1):
        a, b = _flat(_optim(full, 8, rank)), _flat(_optim(split, 8, rank))
        assert a.keys() == b.keys() and any(k.startswith("server.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), rank
    # the momentum is the same on both ranks; the worker errors are not (per-rank state)
    a, b = _flat(_optim(full, 8, 0)), _flat(_optim(full, 8, 1))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("exp_avg"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("e."))


def test_skipped_nonfinite_step_in_the_compression_stage_leaves_state_untouched(pools, tmp_path):
    pools.train(*TINY, "optim.freeze_step=2", "trainer.max_steps=4", "trainer.checkpoint_every=1",
                "trainer.faults.nan_at=3", "trainer.faults.rank=1", f"hydra.run.dir={tmp_path}")
    rows = _rows(tmp_path)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert rows[2]["wire_bytes"] == 16                              # the skipped step sent only the control packet
    d2, d3 = (tmp_path / "checkpoints" / f"step_{s:08d}" / "common.pt" for s in (2, 3))
    a, b = torch.load(d2, weights_only=False)["model"], torch.load(d3, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        a, b = _flat(_optim(tmp_path, 2, rank)), _flat(_optim(tmp_path, 3, rank))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
