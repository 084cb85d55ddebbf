"""comm.feedback=dgc (Deep Gradient Compression's momentum correction, arXiv 1712.01887): two
ranks against a single-process reference that simulates p workers (velocity, accumulation,
Top-K, momentum factor masking, local clipping, the lr rescaling of v), equality with torch's
SGD momentum when nothing is dropped, the sparsity warm-up's densities and exact payload bytes,
the config rules, a skipped step, and the start-up warning for Top-K/sign into AdamW."""
import json
import math

import pytest
import torch

from conftest import run_ranks
from thinwire.comm.accounting import WireMeter
from thinwire.comm.aggregator import CompressedAggregator
from thinwire.comm.compressors import build_compressor
from thinwire.comm.feedback import build_feedback

SIZES = {"w": 400, "b": 30}
STEPS, M, CLIP = 6, 0.9, 3.0
LR_RATIOS = [1.0, 1.0, 2.0, 1.0, 0.5, 1.0]     # what the hook passes when the learning rate changes


def grad_of(rank, step, name):
    g = torch.Generator().manual_seed(100 * step + 7 * rank + SIZES[name])
    return torch.randn(SIZES[name], generator=g) * (1 + rank)


def _run(rank, world_size, ratio, warmup, masking=True):
    agg = CompressedAggregator("topk", {"feedback": "dgc", "ratio": ratio, "momentum": M, "local_clip": CLIP,
                                        "sparsity_warmup": warmup, "factor_masking": masking}, WireMeter())
    outs, payload = [], []
    for step in range(STEPS):
        names = list(SIZES)
        outs.append(agg.launch(names, [grad_of(rank, step, n) for n in names], step, LR_RATIOS[step]).wait())
        payload.append(agg.stats["payload_bytes"])
        agg.commit()
        agg.take_stats()
    return {"outs": outs, "payload": payload, "state": agg.feedback.state_dict()}


def _cases(rank, world_size):
    return {"sparse": _run(rank, world_size, 0.05, 0), "warmup": _run(rank, world_size, 0.02, 4),
            "dense": _run(rank, world_size, 1.0, 0, masking=False), "dense masked": _run(rank, world_size, 1.0, 0)}


def reference(world_size, ratio):
    """Algorithm 1 of DGC with Eq. 4 (u <- m u + g; v <- v + u) and momentum factor masking,
    p workers in one process; Top-K per tensor, the mean over all p ranks."""
    u = {(r, n): torch.zeros(s) for r in range(world_size) for n, s in SIZES.items()}
    v = {(r, n): torch.zeros(s) for r in range(world_size) for n, s in SIZES.items()}
    outs = []
    for step in range(STEPS):
        step_out = []
        for n, size in SIZES.items():
            total = torch.zeros(size)
            for r in range(world_size):
                g = grad_of(r, step, n)
                g = g * min(1.0, CLIP / (float(g.norm()) + 1e-6)) if float(g.norm()) > CLIP else g
                u[r, n] = M * u[r, n] + g
                v[r, n] = v[r, n] * LR_RATIOS[step] + u[r, n]
                k = math.ceil(ratio * size)
                idx = v[r, n].abs().topk(k).indices
                total[idx] += v[r, n][idx]
                u[r, n][idx] = 0.0
                v[r, n][idx] = 0.0
            step_out.append(total / world_size)
        outs.append(step_out)
    return outs, u, v


def test_two_ranks_match_the_reference_and_dense_dgc_is_sgd_momentum(tmp_path):
    out = run_ranks(_cases, 2, tmp_path)
    want, u, v = reference(2, 0.05)
    for step in range(STEPS):
        for got, ref in zip(out[0]["sparse"]["outs"][step], want[step]):
            assert torch.allclose(got, ref, atol=1e-5), step
        assert all(torch.equal(a, b) for a, b in zip(out[0]["sparse"]["outs"][step], out[1]["sparse"]["outs"][step]))
    for r in (0, 1):
        for n in SIZES:
            assert torch.allclose(out[r]["sparse"]["state"][n]["u"], u[r, n], atol=1e-5)
            assert torch.allclose(out[r]["sparse"]["state"][n]["v"], v[r, n], atol=1e-5)
    # nothing dropped, no factor masking: what the optimizer sees is the momentum of the (clipped)
    # mean gradient, so SGD without momentum on it is torch's SGD with momentum M on the mean
    # gradient; with the masking every coordinate's momentum restarts each step: the mean gradient
    for step in range(STEPS):
        for i, n in enumerate(SIZES):
            gs = [grad_of(r, step, n) for r in (0, 1)]
            mean = sum(g * min(1.0, CLIP / (float(g.norm()) + 1e-6)) for g in gs) / 2
            assert torch.allclose(out[0]["dense masked"]["outs"][step][i], mean, atol=1e-6)
    x = {n: torch.zeros(s, requires_grad=True) for n, s in SIZES.items()}
    y = {n: torch.zeros(s, requires_grad=True) for n, s in SIZES.items()}
    sgd = torch.optim.SGD(list(x.values()), lr=0.1, momentum=M)
    for step in range(STEPS):
        for i, n in enumerate(SIZES):
            gs = [grad_of(r, step, n) for r in (0, 1)]
            x[n].grad = sum(g * min(1.0, CLIP / (float(g.norm()) + 1e-6)) for g in gs) / 2
            with torch.no_grad():
                y[n] -= 0.1 * out[0]["dense"]["outs"][step][i]
        sgd.step()                                      # (v is always 0 here: the lr rescaling does nothing)
    assert all(torch.allclose(x[n], y[n], atol=1e-5) for n in SIZES)


def test_sparsity_warmup_schedule_and_exact_payload_bytes(tmp_path):
    fb = build_feedback("dgc", sparsity_warmup=12)
    assert [fb.density(t, 0.001) for t in (0, 2, 3, 5, 6, 8, 9, 11, 12, 100)] == \
        [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001]
    assert build_feedback("dgc").density(0, 0.01) == 0.01 and fb.density(0, 0.5) == 0.5
    out = run_ranks(_cases, 2, tmp_path)
    # 0.02: stages 25% and 6.25%, two steps each, then 2%; payload = what topk sends at that ratio
    ratios = [0.25, 0.25, 0.0625, 0.0625, 0.02, 0.02]
    want = [sum(build_compressor("topk", ratio=d).compress(torch.randn(s)).nbytes for s in SIZES.values())
            for d in ratios]
    assert out[0]["warmup"]["payload"] == want
    # k = ceil(ratio n) entries of 6 B (fp32 value + 16-bit offset) + one int32 count per tensor
    assert want == [sum(6 * math.ceil(d * s) + 4 for s in SIZES.values()) for d in ratios]


def test_config_rules_and_the_start_up_warning(capsys, monkeypatch, tmp_path):
    import thinwire.train
    from thinwire.config import compose, validate
    from thinwire.config.rules import advice
    from thinwire.errors import ConfigError

    dgc = ["optim=sgd", "optim.momentum=0", "comm=topk", "comm.feedback=dgc"]
    validate(compose([*dgc, "comm.sparsity_warmup=100", "comm.local_clip=0.5"]))
    for bad, msg in [([*dgc, "optim.momentum=0.9"], "optim.momentum=0.9: comm.feedback=dgc applies the momentum itself"),
                     (["comm=topk", "comm.feedback=dgc"], "optim=adamw: comm.feedback=dgc applies SGD's momentum"),
                     ([*dgc, "sync=local"], "use sync=ddp"), ([*dgc, "comm=sign1", "comm.sparsity_warmup=5"], "comm.ratio"),
                     ([*dgc, "comm.momentum=1"], "comm.momentum=1"), ([*dgc, "comm.local_clip=-1"], "local_clip")]:
        with pytest.raises(ConfigError, match=msg):
            validate(compose(bad))
    for ov in (["comm=topk"], ["comm=sign1", "comm.feedback=ef"], ["comm=chunk_topk"]):
        (line,) = advice(compose(ov))
        assert "optim=demo" in line and "experiment=sparseloco" in line and "+37-42%" in line
    for ov in (["comm=int8"], ["optim=sgd", "comm=topk"], ["comm=topk", "sync=local"], [],
               ["experiment=sparseloco"], ["comm=int8", "comm.collective=two_phase", "sync=local"]):
        assert advice(compose(ov)) == []
    (line,) = advice(compose(["experiment=sparseloco", "comm.collective=two_phase"]))  # issue 34's measured gap
    assert "comm=chunk_topk comm.collective=two_phase under sync=local" in line and "+15.9%" in line
    # through the command line, in this process (the launch itself replaced)
    monkeypatch.setattr(thinwire.train, "launch_local", lambda cfg, yamls: 0)
    monkeypatch.delenv("RANK", raising=False)
    assert thinwire.train.main(["comm=topk", "logger=none", f"hydra.run.dir={tmp_path}"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thinwire-train: warning: comm=topk with optim=adamw every step")


def test_skipped_nonfinite_step_leaves_dgc_buffers_untouched(pools, tmp_path):
    pools.train("experiment=tiny", "optim=sgd", "optim.momentum=0", "optim.lr=0.1", "comm=topk", "comm.feedback=dgc",
                "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.faults.nan_at=3", "trainer.faults.rank=1",
                "dist.nproc=2", f"hydra.run.dir={tmp_path}")
    with open(tmp_path / "metrics.jsonl") as fh:
        assert [r["skipped_steps"] for r in map(json.loads, fh)] == [0, 0, 1, 1]
    for rank in (0, 1):
        a, b = (torch.load(tmp_path / "checkpoints" / f"step_{s:08d}" / f"rank{rank:05d}.pt",
                           weights_only=False)["comm"]["aggregator"]["feedback"] for s in (2, 3))
        assert a.keys() == b.keys() and all(set(a[n]) == {"u", "v"} for n in a)
        assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
        assert any(a[n]["u"].abs().sum() > 0 for n in a)
