"""SparseLoCo (arXiv 2508.15706) in thinwire: the chunked Top-K compressor against an independent
single-process reference and exact bit counts, the mean over contributors on 2 and 3 gloo ranks,
decayed error feedback, the non-finite round skip of sync=local|co2, and experiment=sparseloco
through the CLI (its wire bytes from the accounting formula, and a bitwise mid-round resume)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from thinwire.comm.accounting import WireMeter, collective_bytes
from thinwire.comm.compressors import build_compressor
from thinwire.comm.compressors.base import pack_bits, pack_uint, unpack_uint
from thinwire.comm.feedback import build_feedback

from conftest import run_ranks


# -- an independent reference of the compressor (loops over runs, numpy fp64 statistics) -------
def reference_code(x: torch.Tensor, chunk: int, k: int, bits: int):
    """(kept global indices, decoded values) of chunked top-k + code-book quantisation."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    idx = []
    for start in range(0, n, chunk):
        run = flat[start:start + chunk]
        r = run.numel()
        keep = k if r == chunk else min(r, k, max(2, math.ceil(k * r / chunk)))
        idx.append(start + torch.topk(run.abs(), keep).indices)
    idx = torch.cat(idx)
    v = flat[idx].double().numpy()
    if bits == 16:
        return idx, torch.from_numpy(v).to(torch.bfloat16).float()
    levels = 2 ** bits
    mu = v.mean()
    sd = np.sqrt(((v - mu) ** 2).sum() / (len(v) - 1)) if len(v) > 1 else 0.0
    w = 6 * sd / levels if sd > 0 else 1.0
    code = np.clip(np.floor((v - mu) / w) + levels // 2, 0, levels - 1).astype(int)
    book = np.array([v[code == j].mean() if (code == j).any() else 0.0 for j in range(levels)])
    return idx, torch.from_numpy(book[code]).float()


def dense(idx, vals, n):
    out = torch.zeros(n)
    out[idx] = vals
    return out


def bitstring_pack(values, width):
    """pack_uint's wire format, written out bit by bit."""
    s = "".join(format(int(v), f"0{width}b") for v in values)
    s += "0" * (-len(s) % 8)
    return torch.tensor([int(s[i:i + 8], 2) for i in range(0, len(s), 8)], dtype=torch.uint8)


@pytest.mark.parametrize("width", list(range(1, 17)) + [20, 24, 31, 32])
def test_pack_uint_is_the_bit_string_of_the_values(width):
    g = torch.Generator().manual_seed(width)
    for n in (0, 1, 7, 101):
        v = torch.randint(0, 2 ** width, (n,), generator=g, dtype=torch.int64)
        packed = pack_uint(v, width)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * width + 7) // 8
        assert torch.equal(packed, bitstring_pack(v.tolist(), width))
        assert torch.equal(unpack_uint(packed, n, width), v)
    bits = torch.rand(29, generator=g) > 0.5
    assert torch.equal(pack_uint(bits.long(), 1), pack_bits(bits))


CASES = [((4096 * 3 + 1000,), {}), ((5, 4096), {"bits": 4}), ((7,), {}), ((1,), {}), ((100, 37), {"bits": 8}),
         ((3000,), {"chunk": 64, "k": 5}), ((9000,), {"chunk": 1000, "k": 20, "bits": 16}),
         ((5005,), {"chunk": 1001, "k": 9}), ((8192,), {"chunk": 512, "k": 256})]


@pytest.mark.parametrize("shape,kw", CASES, ids=[f"{s}-{kw}" for s, kw in CASES])
def test_chunk_topk_equals_the_reference(shape, kw):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3)  # uneven magnitudes
    c = build_compressor("chunk_topk", **kw)
    p = c.compress(x)
    out = c.decompress(p)
    idx, vals = reference_code(x, c.chunk, c.k, c.bits)
    assert out.shape == x.shape
    # the same kept set (no ties in random data), the same decoded values (to fp64 vs fp32 rounding)
    assert torch.equal(out.reshape(-1) != 0, dense(idx, torch.ones(idx.numel()), x.numel()) != 0)
    torch.testing.assert_close(out.reshape(-1), dense(idx, vals, x.numel()), rtol=1e-5, atol=1e-7)
    again = build_compressor("chunk_topk", **kw).compress(x.clone())
    assert all(torch.equal(a, b) for a, b in zip(p.tensors.values(), again.tensors.values()))  # deterministic
    acc = torch.ones(x.numel())
    assert torch.equal(c.accumulate(p, acc), 1 + out.reshape(-1))


def test_selection_keeps_the_k_largest_with_ties():
    """Integer data (many ties): every run keeps k entries whose magnitudes are the k largest."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-6, 7, (4096 * 4,), generator=g).float()
    x[4096:8192] = 0.0  # an all-zero run
    c = build_compressor("chunk_topk", bits=16)
    p = c.compress(x)
    idx, _ = c._entries(p)
    for run in range(4):
        mine = idx[run * 64:(run + 1) * 64]
        assert mine.unique().numel() == 64 and ((mine >= run * 4096) & (mine < (run + 1) * 4096)).all()
        want = torch.topk(x[run * 4096:(run + 1) * 4096].abs(), 64).values
        assert torch.equal(x[mine].abs().sort().values, want.sort().values)


def test_exact_bit_counts():
    x = torch.randn(4096 * 3 + 1000)  # 3 full runs of 64 + ceil(64 * 1000 / 4096) = 16 in the last
    kept = 3 * 64 + 16
    sizes = lambda **kw: {k: t.numel() * t.element_size() for k, t in build_compressor(
        "chunk_topk", **kw).compress(x).tensors.items()}
    assert sizes() == {"indices": kept * 12 // 8, "codes": kept * 2 // 8, "codebook": 4 * 4}
    assert build_compressor("chunk_topk").compress(x).nbytes == 312 + 52 + 16
    assert sizes(bits=4) == {"indices": 312, "codes": kept // 2, "codebook": 16 * 4}
    assert sizes(bits=8) == {"indices": 312, "codes": kept, "codebook": 256 * 4}
    assert sizes(bits=16) == {"indices": 312, "values": kept * 2}
    # 13 full runs of 1000 with 10 each, ceil(10 * 288 / 1000) = 3 in the last; 10-bit indices
    assert sizes(chunk=1000, k=10) == {"indices": math.ceil(133 * 10 / 8), "codes": math.ceil(133 * 2 / 8),
                                       "codebook": 16}
    assert build_compressor("chunk_topk").compress(torch.zeros(5)).tensors["indices"].numel() == \
        math.ceil(2 * 12 / 8)  # a 5-element tensor keeps 2


def test_zeros_and_bad_options():
    c = build_compressor("chunk_topk")
    z = c.decompress(c.compress(torch.zeros(5000)))
    assert (z == 0).all()
    nan = torch.randn(5000)
    nan[3] = float("nan")
    assert torch.isnan(c.decompress(c.compress(nan))).any()  # reported, not hidden
    for kw, msg in [({"chunk": 1}, "chunk=1"), ({"k": 0}, "k=0"), ({"k": 65, "chunk": 64}, "k=65"),
                    ({"bits": 3}, "bits=3"), ({"mean": "median"}, "mean=median"), ({"chunk": 4096.0}, "chunk=4096.0")]:
        with pytest.raises(ValueError, match=f"^chunk_topk: {msg}"):
            build_compressor("chunk_topk", **kw)


# -- the mean over contributors, on gloo ranks -----------------------------------------------
SEGMENTS = [4096 * 2 + 300, 777, 5000]


def rank_tensors(rank):
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(n, generator=g) * (1 + rank) for n in SEGMENTS]


def gather_means(rank, world_size):
    from thinwire.comm import collectives

    meter, out = WireMeter(), {}
    for mean in ("contributors", "all"):
        c = build_compressor("chunk_topk", chunk=512, k=16, mean=mean)
        xs = rank_tensors(rank)
        sent, fut, _, nbytes = collectives.launch(xs, c, meter, steps=[0, 1, 2], group=None)
        out[mean] = fut.wait()
        out[f"{mean}-single"] = collectives.aggregate(xs[0], c, meter)  # the library path
        out[f"{mean}-bytes"] = (meter.take_step()["data"], nbytes)
    return out


@pytest.mark.parametrize("p", [2, 3])
def test_mean_over_contributors_is_bitwise_the_reference_on_every_rank(tmp_path, p):
    results = run_ranks(gather_means, p, tmp_path)
    for mean in ("contributors", "all"):
        c = build_compressor("chunk_topk", chunk=512, k=16, mean=mean)
        for i, n in enumerate(SEGMENTS):
            decoded = [c.decompress(c.compress(rank_tensors(r)[i])) for r in range(p)]
            total, count = torch.zeros(n), torch.zeros(n)
            for d in decoded:  # rank order
                total = total + d
                count = count + (d != 0).float()
            ref = total / count.clamp(min=1) if mean == "contributors" else total / p
            for r in range(p):
                assert torch.equal(results[r][mean][i], ref), (mean, i, r)
                if i == 0:
                    assert torch.equal(results[r][f"{mean}-single"], ref)
            if mean == "contributors":  # a coordinate one rank sent is that rank's value
                only = (count == 1) & (decoded[0] != 0)
                assert only.any() and torch.equal(ref[only], decoded[0][only])
        data, nbytes = results[0][f"{mean}-bytes"]
        single = c.compress(rank_tensors(0)[0]).nbytes
        assert data == collective_bytes("all_gather", nbytes + single, 1, p)


# -- decayed error feedback --------------------------------------------------------------------
def test_ef_decay_1_is_classic_ef_bitwise_and_beta_matches_a_hand_reference():
    from thinwire.comm.aggregator import CompressedAggregator

    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(3000, generator=g) for _ in range(5)]
    ratios = [1.0, 1.0, 0.5, 2.0, 1.0]
    c = build_compressor("chunk_topk", chunk=256, k=8)
    # beta = 1: the same bits as the rule before ef_decay existed (q = g + e * lr_ratio)
    fb, e = build_feedback("ef", ef_decay=1.0), None
    for t, (gr, lr) in enumerate(zip(grads, ratios)):
        q = fb.message("w", gr, lr)
        want = gr.clone() if e is None else (gr + e * lr if lr != 1.0 else gr + e)
        assert torch.equal(q, want)
        local = c.decompress(c.compress(q))
        _, bufs = fb.result("w", gr, q, local, local)
        fb.commit({"w": bufs})
        e = q - local
    # beta < 1 through the aggregator (one process: the mean is what this rank sent)
    beta = 0.9
    agg = CompressedAggregator("chunk_topk", {"feedback": "ef", "ef_decay": beta, "chunk": 256, "k": 8},
                               WireMeter())
    e = torch.zeros(3000)
    for t, gr in enumerate(grads):
        out = agg.launch(["w"], [gr], t).wait()[0]
        agg.commit()
        q = beta * e + gr                                   # e <- beta e + Delta
        sent = c.decompress(c.compress(q))                  # send C(e)
        e = q - sent                                        # e <- e - C(e)
        assert torch.equal(out, sent) and torch.equal(agg.feedback.store["w"]["e"], e), t
    # lr_ratio still rescales the residual, on top of the decay
    fb = build_feedback("ef", ef_decay=beta)
    fb.commit({"w": {"e": torch.ones(4)}})
    assert torch.equal(fb.message("w", torch.zeros(4), 0.5), torch.full((4,), beta * 0.5))


# -- non-finite pseudo-gradients: the round is skipped on every rank ---------------------------
COMM = {"name": "chunk_topk", "feedback": "ef", "ef_decay": 0.9, "warmup_steps": 0, "min_numel": 64,
        "collective": "auto", "seed": 0, "eta": 0.1, "init": "dense", "chunk": 128, "k": 8, "bits": 2,
        "mean": "contributors"}


def poisoned_rounds(rank, world_size, name, H, rounds, poison_round):
    from thinwire.comm.sync import build_sync
    from thinwire.models.gpt import build_gpt
    from thinwire.data.base import DataInfo
    from thinwire.trainer.world import World

    world = World(rank, world_size, 0, torch.device("cpu"), "gloo", dist.new_group())
    torch.manual_seed(0)
    model = build_gpt(info=DataInfo("tokens", 0, vocab_size=20), n_layer=1, n_head=2, n_embd=16, block_size=8)
    sync = OmegaConf.create({"name": name, "local_steps": H, "clip": float("inf"), "clip_mode": "norm",
                             "staleness_penalty": 0.0, "outer_optim": {"_target_": "torch.optim.SGD", "lr": 1.0}})
    if name == "local":
        del sync["staleness_penalty"]
    meter = WireMeter()
    strategy = build_sync(sync, world, meter, model, OmegaConf.create(COMM))
    params = [p for p in model.parameters()]
    seen = []
    for step in range(H * rounds):
        g = torch.Generator().manual_seed(100 * step + rank)
        with torch.no_grad():  # an inner step
            for p in params:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
            if rank == 0 and step == H * (poison_round + 1) - 1:
                params[1].view(-1)[3] = float("nan")
        m = strategy.after_step(step)
        if m:
            seen.append({"metrics": m, "anchor": [a.clone() for a in strategy.anchor],
                         "ef": strategy.averager.state_dict()["feedback"],
                         "live": [p.detach().clone() for p in params],
                         "control": meter.totals.get("control", 0)})
    strategy.close()
    return seen


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def same_ef(a, b):
    return a.keys() == b.keys() and all(same(a[n].values(), b[n].values()) for n in a)


@pytest.mark.parametrize("name", ["local", "co2"])
def test_nonfinite_pseudo_gradient_skips_the_round_on_every_rank(tmp_path, name):
    seen = run_ranks(poisoned_rounds, 2, tmp_path, name, 2, 4, 1)
    for rank in (0, 1):
        r = seen[rank]
        assert [x["metrics"]["outer_skipped"] for x in r] == [0, 1, 1, 1]
        assert r[1]["control"] > r[0]["control"] > 0  # the flag is control traffic, every round
        assert same(r[1]["live"], r[1]["anchor"])       # every rank restarts from the anchor
        assert all(torch.isfinite(t).all() for x in r for t in x["live"])
        if name == "local":  # the skipped round changed nothing: anchor, EF buffers
            assert same(r[1]["anchor"], r[0]["anchor"]) and same_ef(r[1]["ef"], r[0]["ef"]) and r[0]["ef"]
        else:  # co2: round 1 was never launched, so round 2 consumes nothing and commits nothing
            assert same(r[2]["anchor"], r[1]["anchor"]) and same_ef(r[2]["ef"], r[1]["ef"]) and r[1]["ef"]
            assert not same(r[3]["anchor"], r[2]["anchor"])  # round 2's average arrives at round 3
    for a, b in zip(seen[0], seen[1]):
        assert same(a["anchor"], b["anchor"])


# -- experiment=sparseloco through the CLI ---------------------------------------------------
SMALL = ["experiment=sparseloco", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=32",
         "data.batch_size=8", "logger=none", "trainer.sample_chars=0", "trainer.progress=false",
         "trainer.max_steps=32", "trainer.eval_every=16", "trainer.checkpoint_every=10"]


def rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def expected_round_bytes(sizes, p):
    """Data bytes one rank sends per outer round for parameters of ``sizes`` elements: the
    all-gather of every compressed parameter's payload, and one fp32 all-reduce of the
    parameters below comm.min_numel (4096)."""
    c = build_compressor("chunk_topk")
    payload = sum(c.compress(torch.randn(n)).nbytes for n in sizes if n >= 4096)
    small = sum(n for n in sizes if n < 4096)
    return collective_bytes("all_gather", payload, 1, p) + collective_bytes("all_reduce", small, 4, p)


def test_experiment_runs_and_resumes_mid_round_bitwise(pools, tmp_path):
    """Rounds end at steps 15 and 30; stopped at step 20, in the middle of round 2, with round 1's
    error-feedback buffers and the anchor in the checkpoint."""
    full, split = tmp_path / "full", tmp_path / "split"
    p = pools.train(*SMALL, f"hydra.run.dir={full}")
    r = rows(full)
    assert [x["step"] for x in r] == list(range(1, 33))
    # two rounds of 1.56 % of the pseudo-gradient move the anchor a little (the rest waits in EF)
    assert r[-1]["val_loss"] < r[0]["loss"] and r[30]["loss"] < r[0]["loss"]
    model = torch.load(full / "checkpoints" / "step_00000032" / "rank00000.pt", weights_only=False)["model"]
    tensors = {t.untyped_storage().data_ptr(): t for t in model.values()}  # the tied lm_head once
    per_round = expected_round_bytes([t.numel() for t in tensors.values()], 2)
    for x in r:
        if "val_loss" in x:  # evaluation averages the ranks' parameters (counted in wire_bytes)
            continue
        data = x["wire_bytes"] - x["control_bytes"]
        if x["step"] % 15:  # inner steps send nothing
            assert data == 0 and "outer_round" not in x, x
        else:  # a round: the sparse all-gather + the dense small tensors, the 4-byte finiteness flag
            # and the replica-drift guard's 8-byte hash + 8-byte skip count (all-gathered at p = 2)
            assert data == per_round and x["control_bytes"] == 4 + 16 and x["outer_skipped"] == 0, x
            assert x["compression_ratio"] > 20
    p = pools.train(*SMALL, "trainer.stop_after=20", f"hydra.run.dir={split}")
    p = pools.train(*SMALL, "trainer.resume=auto", f"hydra.run.dir={split}")
    assert "at step 20" in p.stdout
    key = ("step", "loss", "val_loss", "wire_bytes")
    assert [[x.get(k) for k in key] for x in rows(full)] == [[x.get(k) for k in key] for x in rows(split)]
    for rank in (0, 1):
        a, b = (torch.load(d / "checkpoints" / "step_00000032" / f"rank{rank:05d}.pt", weights_only=False)
                for d in (full, split))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), rank
        ea, eb = a["sync"]["averager"]["feedback"], b["sync"]["averager"]["feedback"]
        assert ea and same_ef(ea, eb)


def test_preset_composes_with_co2_and_rejects_what_cannot_work():
    from thinwire.config import ConfigError, compose, validate

    cfg = compose(["experiment=sparseloco"])
    validate(cfg)
    assert (cfg.sync.name, cfg.sync.local_steps, cfg.sync.clip, cfg.sync.outer_optim.momentum) == ("local", 15,
                                                                                                   math.inf, 0.0)
    assert (cfg.comm.name, cfg.comm.feedback, cfg.comm.ef_decay, cfg.comm.k, cfg.comm.chunk, cfg.comm.bits,
            cfg.comm.mean, cfg.optim.name) == ("chunk_topk", "ef", 0.95, 64, 4096, 2, "contributors", "adamw")
    validate(compose(["experiment=sparseloco", "sync=co2"]))
    validate(compose(["experiment=sparseloco", "comm.collective=two_phase"]))  # run-aligned two_phase (issue 34)
    validate(compose(["experiment=sparseloco", "comm.collective=two_phase", "comm.mean=all"]))
    with pytest.raises(ConfigError, match=r"^comm.ef_decay=0.5: not an option of comm.feedback=none"):
        validate(compose(["comm=topk", "comm.feedback=none", "comm.ef_decay=0.5"]))
