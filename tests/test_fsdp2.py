"""engine=fsdp2: FSDP2 and HSDP under thinwire's loop (CPU, gloo, pooled ranks).

- sync=ddp at 2 ranks (FSDP2's reduce-scatter) equals engine=ddp, and resumes bitwise from
  its Distributed Checkpoint (DCP) files;
- 2 islands of 1 rank (S = 1): every sync strategy x compressor family equals engine=ddp
  with the same comm (sync=ddp: per-step compression of the gradient shards);
- sync=ddp comm=topk on 2 islands of 2 equals a per-shard single-process reference;
- sync=local (DiLoCo's outer Nesterov) across 2 islands of 2 ranks (HSDP layout, 4 ranks)
  equals a single-process reference that averages gradients inside each island, then
  pseudo-gradients across islands; a compressed outer average (int8) keeps the islands'
  ranks identical;
- diverged replicas are checkpointed per island: each island restores its own parameters
  (a world-wide DCP save would restore a mix);
- impossible shapes exit 2 with one line (a crafted DCP metadata file: tests/test_dcp_safety.py).
"""
import io
import json
import os

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
    """2 ranks, AdamW, dropout: engine=fsdp2 sync=ddp,
    stopped after step 3 and resumed from its DCP checkpoint, gives the uninterrupted
    engine=ddp run's losses, val losses and parameters (at steps 3 and 6) bitwise. No
    clipping: clip_grad_norm_ over shards adds the squares in another order (measured with
    optim.grad_clip=0.5: within rtol 1e-5 of ddp, not bitwise)."""
    common = [*BASE, "model.dropout=0.1", "optim.grad_clip=0"]
    POOLS.train(*common, "engine=ddp", f"hydra.run.dir={tmp_path}/ddp")
    POOLS.train(*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/split", "trainer.stop_after=3")
    run = POOLS.train(*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/split", "trainer.resume=auto")
    assert "resumed from" in run.stdout and "at step 3" in run.stdout
    b, d = metrics(tmp_path / "split"), metrics(tmp_path / "ddp")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "val_loss", "lr"):  # fsdp2, stopped and resumed == ddp uninterrupted, bitwise
        assert [r.get(key) for r in b] == [r.get(key) for r in d], key
    for step in (3, 6):
        ckpt = tmp_path / "split" / "checkpoints" / f"step_{step:08d}"
        assert (ckpt / "dcp" / ".metadata").exists() and "model" not in torch.load(ckpt / "common.pt",
                                                                                   weights_only=True)
        mine = dcp_params(ckpt / "dcp")  # resharded: 2 ranks' shards read in one process
        ref = torch.load(tmp_path / "ddp" / "checkpoints" / f"step_{step:08d}" / "common.pt",
                         weights_only=True)["model"]
        assert set(mine) <= set(ref) and "tok_emb.weight" in mine
        for k, v in mine.items():
            assert torch.equal(v, ref[k]), (step, k)


# -- 2 islands of 1 rank (S = 1: each local shard is the whole tensor) == engine=ddp ---------
SYNCS = {"ddp": [], "local": ["sync=local", "sync.local_steps=2"], "diloco": ["sync=diloco", "sync.local_steps=2"],
         "co2": ["sync=co2", "sync.local_steps=2"], "eager": ["sync=co2", "sync.overlap=eager", "sync.local_steps=2"],
         "streaming": ["sync=diloco", "sync.local_steps=2", "sync.fragments=2"],
         "moments": ["sync=local", "sync.local_steps=2", "sync.moment1_every=1", "sync.moment2_every=2"]}
COMMS = {"topk": ["comm=topk", "comm.ratio=0.05"], "int8": ["comm=int8"], "randk": ["comm=randk", "comm.ratio=0.1"],
         "chunk_topk": ["comm=chunk_topk", "comm.min_numel=1024", "comm.chunk=256", "comm.k=16"]}
DEFAULT_TIER = {("ddp", "topk"), ("co2", "chunk_topk"), ("moments", "int8")}


@pytest.mark.parametrize("sync,comm", [
    pytest.param(s, c, marks=() if (s, c) in DEFAULT_TIER else pytest.mark.extended) for s in SYNCS for c in COMMS])
def test_shard_size_one_equals_ddp(sync, comm, tmp_path):
    """2 ranks, engine.shard_group_size=1 (two islands of one rank: FSDP2's local shard is the
    whole tensor), every sync strategy x a compressor family with error feedback: every
    metric equals engine=ddp's with the same comm (per-step compression of the gradient
    shards under sync=ddp; the outer average otherwise), bitwise; residual_norm to 1e-12
    (its squares are added in another order; not under co2: once it read 2.64 against 1.81
    at step 6 with every other metric equal, presumably as a round's residuals are counted
    when gloo's thread finishes it; not investigated). sync=ddp also stops after step 3 and
    resumes (error feedback from the rank files) and its parameters equal DDP's at step 6."""
    common = [*BASE, "optim.grad_clip=0", *SYNCS[sync], *COMMS[comm]]
    POOLS.train(*common, "engine=ddp", f"hydra.run.dir={tmp_path}/ddp")
    fsdp = [*common, "engine=fsdp2", "engine.shard_group_size=1", f"hydra.run.dir={tmp_path}/fsdp2"]
    if sync == "ddp":
        POOLS.train(*fsdp, "trainer.stop_after=3")
        assert "resumed from" in POOLS.train(*fsdp, "trainer.resume=auto").stdout
    else:
        POOLS.train(*fsdp)
    d, f = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in f] == list(range(1, 7))
    assert max(r.get("compression_ratio", 0) for r in d) > 1.5, d[-1]  # compressed in earnest
    for key in ("loss", "val_loss", "lr", "wire_bytes", "compression_ratio"):
        assert [r.get(key) for r in f] == [r.get(key) for r in d], key
    norms = [(r.get("residual_norm"), q.get("residual_norm")) for r, q in zip(f, d)]
    if sync not in ("co2", "eager"):  # see the docstring
        assert all(a == b or a == pytest.approx(b, rel=1e-12) for a, b in norms), norms
    if sync == "ddp":
        mine = dcp_params(tmp_path / "fsdp2" / "checkpoints" / "step_00000006" / "dcp")
        ref = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000006" / "common.pt", weights_only=True)["model"]
        assert all(torch.equal(v, ref[k]) for k, v in mine.items())


# -- 2 islands x 2 ranks: the outer loop across islands on local shards --------------------
INNER = {"lr": 0.2, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0, "schedule": "constant",
         "warmup_steps": 0, "min_lr_ratio": 1.0, "decay_start": None, "grad_clip": 0.0}
OUTER = {"name": "local", "local_steps": 3, "clip": 1e6, "clip_mode": "norm", "staleness_penalty": 0.0,
         "outer_optim": {"_target_": "torch.optim.SGD", "lr": 0.8, "momentum": 0.6, "nesterov": True}}
ENGINE = {"name": "fsdp2", "shard_group_size": 2, "reshard_after_forward": True, "param_dtype": None,
          "reduce_dtype": None}


def make_model():
    """test_sync's tiny GPT with an odd vocabulary (21 rows: uneven shards of 11 and 10)."""
    from thinwire.data.base import DataInfo
    from thinwire.models.gpt import build_gpt

    torch.manual_seed(0)
    return build_gpt(info=DataInfo("tokens", 0, vocab_size=21), n_layer=2, n_head=2, n_embd=16, block_size=8)


def islands_run(rank, world_size, runs, root):
    """The loop's calls by hand on engine=fsdp2 with islands of 2 ranks: compute (FSDP2
    reduce-scatters inside the island), apply, sync.after_step; then every rank's whole
    parameters, the evaluated mean, and a mid-round checkpoint round trip of the diverged
    replicas (per island, and the naive world-wide save for contrast)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.sync import build_sync
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    from test_sync import B, batch

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    out = {"hsdp": hsdp_run(world, 4), "hsdp_topk": hsdp_run(world, 4, TOPK, os.path.join(root, "topk"))}
    for name, (steps, comm) in runs.items():
        model, meter, comm = make_model(), WireMeter(), OmegaConf.create(comm)
        engine = build_engine(OmegaConf.create(ENGINE), model, world, meter, comm, grad_sync=False)
        plugin = engine.attach(SGDPlugin(OmegaConf.create(INNER), model, max_steps=steps), B)
        strategy = build_sync(OmegaConf.create(OUTER), world, meter, model, comm, replicas=engine.replicas)
        outer_bytes = 0
        for step in range(steps):
            plugin.compute(engine.forward_model, batch(step, rank, world_size))
            plugin.apply(step)
            meter.take_step()
            strategy.after_step(step)
            outer_bytes += meter.take_step().get("data", 0)
        whole = lambda: {k: v.full_tensor().clone() for k, v in model.state_dict().items()}  # noqa: E731
        res = {"params": whole(), "outer_bytes": outer_bytes, "numel": engine.numel,
               "outer_numel": sum(a.numel() for a in strategy.anchor), "sizes": list(strategy.space.sizes),
               "names": list(strategy.space.names)}
        with strategy.eval_model() as m:
            res["mean"] = {k: v.full_tensor().clone() for k, v in m.state_dict().items()}
        assert all(torch.equal(v, res["params"][k]) for k, v in whole().items())  # live parameters back
        if name == "none":  # mid-round (steps % H != 0): the replicas differ; a checkpoint round trip
            path = os.path.join(root, "ckpt")
            engine.save_extra(path)
            momentum = [plugin.optimizer.state[p]["momentum_buffer"].to_local().clone() for p in model.parameters()]
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().zero_()
            engine.load_extra(path, True)
            res["restored"] = whole()
            res["momentum_ok"] = all(torch.equal(plugin.optimizer.state[p]["momentum_buffer"].to_local(), m)
                                     for p, m in zip(model.parameters(), momentum))
            # the naive way: one world-wide save and load of the diverged replicas
            naive = os.path.join(root, "naive")
            dcp.save(engine._state(), checkpoint_id=naive)
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().zero_()
            state = engine._state()
            dcp.load(state, checkpoint_id=naive)
            from torch.distributed.checkpoint.state_dict import set_state_dict
            set_state_dict(model, plugin.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            res["naive"] = whole()
        res["averager"] = strategy.averager.state_dict()
        out[name] = res
        strategy.close()
    return out


TOPK = {"name": "topk", "ratio": 0.1, "feedback": "ef", "warmup_steps": 1, "min_numel": 16}


def hsdp_run(world, steps, comm=None, save=None):
    """sync=ddp on 2 islands of 2, SGD, the loop's engine calls by hand: comm=none is native
    HSDP on the 2-D (replicate, shard) mesh; a compressor compresses the local gradient
    shards over the replicate group after backward (comm_tail_s), with error feedback."""
    from thinwire.comm.accounting import WireMeter
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine

    from test_sync import batch

    model, meter = make_model(), WireMeter()
    engine = build_engine(OmegaConf.create(ENGINE), model, world, meter, OmegaConf.create(comm or {"name": "none"}),
                          grad_sync=True)
    plugin = engine.attach(SGDPlugin(OmegaConf.create(INNER), model, max_steps=steps), 4)
    for step in range(steps):
        engine.set_lr(plugin.lr(step))
        plugin.compute(engine.forward_model, batch(step, world.rank, world.world_size))
        if comm:
            engine.comm_tail_s(0.0, 0.0)
        plugin.apply(step)
        engine.commit()
    meter.take_step()
    if not comm:
        engine.comm_tail_s(0.0, 0.0)  # once per step: the replicate all-reduce of this rank's gradient shard
    if save:
        engine.save_extra(save)
    return {**whole_state(engine, plugin), "bytes": meter.take_step().get("data", 0),
            "local": sum(p.to_local().numel() for p in model.parameters()),
            "mesh": tuple(engine.mesh.mesh_dim_names), "params": {k: v.full_tensor().clone()
                                                                   for k, v in model.state_dict().items()},
            "comm_state": engine.comm_state_dict(),
            "sizes": {n: p.to_local().numel() for n, p in model.named_parameters()}}


def whole_state(engine, plugin) -> dict:
    """Whole tensors of the inner optimizer's momentum and of the per-step error feedback."""
    from thinwire.trainer.fsdp2_shards import feedback_dtensors

    model = engine.module
    out = {"momentum": {n: plugin.optimizer.state[p]["momentum_buffer"].full_tensor().clone()
                        for n, p in model.named_parameters() if p in plugin.optimizer.state}}
    if hasattr(engine.hook_state, "aggregator"):
        store = engine.hook_state.aggregator.feedback.state_dict()
        out["ef"] = {k: v.full_tensor() for k, v in feedback_dtensors(store, model).items()}
        out["iteration"] = engine.hook_state.iteration
    return out


def reshard_load(rank, world_size, size, path):
    """engine=fsdp2 sync=ddp comm=topk on islands of ``size`` ranks, loading the 2x2
    checkpoint at ``path`` (load_extra, as a resume does): whole parameters, momentum, EF."""
    import contextlib
    import io

    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    model = make_model()
    engine = build_engine(OmegaConf.create({**ENGINE, "shard_group_size": size}), model, world, WireMeter(),
                          OmegaConf.create(TOPK), grad_sync=True)
    plugin = engine.attach(SGDPlugin(OmegaConf.create(INNER), model, max_steps=4), 4)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        engine.load_extra(path, same_world=world_size == 4)
    return {**whole_state(engine, plugin), "said": said.getvalue(),
            "params": {k: v.full_tensor().clone() for k, v in model.state_dict().items()}}


def compressed_hsdp_reference(steps, comm):
    """One model (the islands stay equal); each step island i's gradient is its two ranks'
    mean (FSDP2's reduce-scatter); each parameter is cut on dim 0 into the 2 shards FSDP2
    keeps (torch.chunk) and each shard j, for each island, is sent as Top-K of
    m = g + e (k = ceil(ratio * shard numel): the per-shard rule) with e <- m - TopK(m); the
    optimizer sees the mean (TopK(m_0) + TopK(m_1)) / 2. Shards under min_numel go exact
    (mean of m); the first warmup_steps are dense means with no residual."""
    import math

    from test_sync import batch

    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=INNER["lr"], momentum=INNER["momentum"])
    residual = {}
    for step in range(steps):
        island = []
        for i in range(2):
            grads = []
            for r in (2 * i, 2 * i + 1):
                m.zero_grad()
                m(**batch(step, r, 4)).backward()
                grads.append([p.grad.clone() for p in m.parameters()])
            island.append([(a + b) / 2 for a, b in zip(*grads)])
        for (name, p), g0, g1 in zip(m.named_parameters(), *island):
            shards = []
            for j, (a, b) in enumerate(zip(g0.chunk(2), g1.chunk(2))):
                a, b = a.reshape(-1), b.reshape(-1)
                if step < comm["warmup_steps"]:
                    shards.append((a + b) / 2)
                    continue
                msgs = [x + residual[(name, j, i)] if (name, j, i) in residual else x.clone()
                        for i, x in enumerate((a, b))]
                if a.numel() < comm["min_numel"]:
                    shards.append((msgs[0] + msgs[1]) / 2)
                    continue
                sent = []
                for i, x in enumerate(msgs):
                    idx = x.abs().topk(math.ceil(comm["ratio"] * x.numel())).indices
                    s = torch.zeros_like(x)
                    s[idx] = x[idx]
                    residual[(name, j, i)] = x - s
                    sent.append(s)
                shards.append((sent[0] + sent[1]) / 2)
            p.grad = torch.cat(shards).view_as(p)
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def hsdp_reference(steps):
    """One model; each step's gradient averaged inside each island first, then across:
    ((g0 + g1) / 2 + (g2 + g3) / 2) / 2."""
    from test_sync import batch

    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=INNER["lr"], momentum=INNER["momentum"])
    for step in range(steps):
        grads = []
        for r in range(4):
            m.zero_grad()
            m(**batch(step, r, 4)).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        for p, *g in zip(m.parameters(), *grads):
            p.grad = ((g[0] + g[1]) / 2 + (g[2] + g[3]) / 2) / 2
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def island_reference(steps):
    """Two replicas of the unsharded model; each step replica i's gradient is the mean of its
    two ranks' gradients (FSDP2's reduce-scatter), then its own SGD; every H steps the
    pseudo-gradients a - w_i are averaged across the replicas (d0 + d1) / 2 and the anchor
    takes one Nesterov SGD step; both replicas restart from it."""
    from test_sync import batch

    models = [make_model() for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=INNER["lr"], momentum=INNER["momentum"]) for m in models]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    o = OUTER["outer_optim"]
    outer = torch.optim.SGD(anchor, lr=o["lr"], momentum=o["momentum"], nesterov=True)
    for step in range(steps):
        for i, (m, opt) in enumerate(zip(models, opts)):
            grads = []
            for r in (2 * i, 2 * i + 1):
                m.zero_grad()
                m(**batch(step, r, 4)).backward()
                grads.append([p.grad.clone() for p in m.parameters()])
            for p, ga, gb in zip(m.parameters(), *grads):
                p.grad = ga / 2 + gb / 2
            opt.step()
        if (step + 1) % OUTER["local_steps"] == 0:
            with torch.no_grad():
                for j, a in enumerate(anchor):
                    deltas = [a - list(m.parameters())[j] for m in models]
                    a.grad = (deltas[0] + deltas[1]) / 2
                outer.step()
                for m in models:
                    for p, a in zip(m.parameters(), anchor):
                        p.copy_(a)
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


@pytest.mark.extended
def test_local_across_islands_equals_island_first_reference(tmp_path):
    """4 ranks, islands {0,1} {2,3}. sync=ddp: native HSDP equals the island-first reference,
    and comm=topk (per-step, per local shard, error feedback) equals its per-shard
    single-process reference (bitwise). FSDP2 inside, 1-D mesh, sync=local with DiLoCo's outer
    Nesterov across them on local shards: every rank's whole parameters equal the reference's
    replica (bitwise); the evaluated mean is the replicas' mean on every rank; anchor and
    outer state are half of the model per rank. A mid-round checkpoint (replicas diverged)
    restores each island's own parameters and momentum from replica{r}/, where one
    world-wide DCP save restores a mix. int8 two-phase on the cross-island average: the run
    stays close to the dense one; its outer bytes are about one byte per local element and round."""
    from thinwire.comm.accounting import collective_bytes

    steps = 5
    runs = {"none": (steps, {"name": "none"}),
            "int8": (6, {"name": "int8", "collective": "two_phase", "feedback": "none", "min_numel": 64}),
            "topk": (6, {"name": "chunk_topk", "chunk": 16, "k": 4, "feedback": "ef", "min_numel": 16})}
    results = run_ranks(islands_run, 4, tmp_path, runs, str(tmp_path))
    # sync=ddp: native HSDP == the island-first reference, bitwise
    hsdp = hsdp_reference(4)
    for rank in range(4):
        assert results[rank]["hsdp"]["mesh"] == ("replicate", "shard")
        assert results[rank]["hsdp"]["bytes"] == collective_bytes("all_reduce", results[rank]["hsdp"]["local"], 4, 2)
        for k, v in hsdp.items():
            assert torch.equal(results[rank]["hsdp"]["params"][k], v), (rank, k)
    # sync=ddp comm=topk (per-step compression of the local gradient shards over the
    # replicate group, error feedback) == the per-shard single-process reference, bitwise
    topk = compressed_hsdp_reference(4, TOPK)
    for rank in range(4):
        res = results[rank]["hsdp_topk"]
        assert res["mesh"] == ("shard",) and res["bytes"] == 0  # no native replicate all-reduce
        for k, v in topk.items():
            assert torch.equal(res["params"][k], v), (rank, k)
        assert not all(torch.equal(v, hsdp[k]) for k, v in topk.items())  # compressed: not the exact mean
        feedback = res["comm_state"]["aggregator"]["feedback"]
        assert feedback and all(v["e"].numel() == res["sizes"][n] for n, v in feedback.items()), res["sizes"]
    # resharding: the 2x2 checkpoint resumed as 2x1 (same replica count: model, momentum and
    # error feedback exact) and as 1x4 (one replica: model and momentum exact, EF reset, one line)
    saved = results[0]["hsdp_topk"]
    assert saved["ef"] and saved["iteration"] == 4
    for size, world in ((1, 2), (4, 4)):
        loaded = run_ranks(reshard_load, world, tmp_path, size, os.path.join(str(tmp_path), "topk"))
        for rank, got in enumerate(loaded):
            for k, v in results[0]["hsdp_topk"]["params"].items():
                assert torch.equal(got["params"][k], v), (size, rank, k)
            assert got["momentum"].keys() == saved["momentum"].keys()
            assert all(torch.equal(got["momentum"][k], v) for k, v in saved["momentum"].items()), (size, rank)
            assert got["iteration"] == 4
            island = results[2 * rank]["hsdp_topk"] if size == 1 else None  # replica r = old island r
            if size == 1:
                assert got["ef"].keys() == island["ef"].keys()
                assert all(torch.equal(got["ef"][k], v) for k, v in island["ef"].items()), rank
            else:
                assert got["ef"] == {}
        said = loaded[0]["said"].strip().splitlines()
        assert len(said) == 1 and ("error feedback resharded" if size == 1 else "error feedback reset") in said[0]
    assert not all(torch.equal(results[0]["hsdp_topk"]["ef"][k], results[2]["hsdp_topk"]["ef"][k])
                   for k in results[0]["hsdp_topk"]["ef"])  # the islands' residuals differ
    ref = island_reference(steps)
    for rank in range(4):
        res = results[rank]["none"]
        for k, v in ref[rank // 2].items():
            assert torch.equal(res["params"][k], v), (rank, k)
            torch.testing.assert_close(res["mean"][k], (ref[0][k] + ref[1][k]) / 2, rtol=1e-6, atol=1e-7)
            assert torch.equal(res["mean"][k], results[0]["none"]["mean"][k])
        assert res["outer_numel"] + results[rank ^ 1]["none"]["outer_numel"] == res["numel"]  # 1/S per rank
        # the per-island checkpoint restores this island's own state
        assert all(torch.equal(res["restored"][k], v) for k, v in res["params"].items()), rank
        assert res["momentum_ok"], rank
    assert results[0]["none"]["names"] == results[1]["none"]["names"]
    assert results[0]["none"]["sizes"] == results[2]["none"]["sizes"]
    assert results[0]["none"]["sizes"][0] == 11 * 16 and results[1]["none"]["sizes"][0] == 10 * 16  # uneven
    assert not all(torch.equal(ref[0][k], ref[1][k]) for k in ref[0])       # diverged mid-round
    # the naive world-wide save: some rank restores another island's values
    assert any(not all(torch.equal(r["none"]["naive"][k], r["none"]["params"][k]) for k in r["none"]["params"])
               for r in results)
    for rank in range(4):
        q = results[rank]["int8"]
        assert all(torch.equal(q["params"][k], results[rank ^ 1]["int8"]["params"][k]) for k in q["params"])
        assert 2 * 0.5 * q["outer_numel"] <= q["outer_bytes"] <= 2 * 1.3 * q["outer_numel"], q["outer_bytes"]
    # chunk Top-K + error feedback on the cross-island average: residuals per local shard,
    # named by the global parameter; both ranks of an island hold the same whole parameters
    for rank in range(4):
        t = results[rank]["topk"]
        assert all(torch.equal(t["params"][k], results[rank ^ 1]["topk"]["params"][k]) for k in t["params"])
        assert not all(torch.equal(t["params"][k], results[rank]["int8"]["params"][k]) for k in t["params"])
        sizes = dict(zip(t["names"], t["sizes"]))
        feedback = t["averager"]["feedback"]
        assert feedback and set(feedback) <= set(sizes)
        for n, v in feedback.items():
            residual = v if torch.is_tensor(v) else next(x for x in v.values() if torch.is_tensor(x))
            assert residual.numel() == sizes[n], (n, residual.shape, sizes[n])


@pytest.mark.parametrize("overrides,needle", [
    (["dist.nproc=4", "engine.shard_group_size=3"], "engine.shard_group_size=3"),
    (["engine.shard_group_size=0"], "shard_group_size=0"),
    (["engine=ddp", "engine.shard_group_size=2"], "engine.shard_group_size: not an option of engine=ddp"),
    (["optim=mezo"], "optim=mezo"),
    (["optim=zo_dist"], "optim=zo_dist"),
    (["optim=demo", "optim.update_rule=adamw"], "optim.update_rule=adamw"),
    (["peft=lora"], "peft=lora"),
    (["data.eval_batches=3"], "data.eval_batches=3"),
])
def test_impossible_shapes_exit_2_with_one_line(overrides, needle, capsys, tmp_path):
    from thinwire.train import main

    with pytest.raises(SystemExit) as exc:
        main(["engine=fsdp2", "experiment=tiny", "dist.nproc=2", *overrides, f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


@pytest.mark.extended
@pytest.mark.parametrize("overlap", ["stale", "eager"])
def test_co2_across_islands_resumes_bitwise(tmp_path, overlap):
    """4 ranks, islands {0,1} {2,3}, co2 across them (H=4: step 6 is mid-round with round
    1's int8 average in flight), AdamW: stopped after step 6 and resumed, every metric and each
    island's parameters (its own replica{r}/ DCP files) equal the uninterrupted run's."""
    args = ["experiment=tiny", "dist.nproc=4", "engine=fsdp2", "engine.shard_group_size=2", "sync=co2",
            f"sync.overlap={overlap}", "sync.local_steps=4", "comm=int8", "trainer.max_steps=12",
            "trainer.eval_every=6", "trainer.checkpoint_every=6", "data.eval_batches=4"]
    assert_islands_resume_bitwise(tmp_path, args, 6, 12)


def assert_islands_resume_bitwise(tmp_path, args, stop: int, steps: int) -> None:
    """``args`` (2 islands, ``steps`` steps, a checkpoint at ``steps``) run uninterrupted, and
    stopped after ``stop`` then resumed: every metric and each island's final parameters (its
    own replica{r}/ DCP files) equal; the two islands differ."""
    POOLS.train(*args, f"hydra.run.dir={tmp_path}/full")
    POOLS.train(*args, f"hydra.run.dir={tmp_path}/split", f"trainer.stop_after={stop}")
    assert "resumed from" in POOLS.train(*args, f"hydra.run.dir={tmp_path}/split", "trainer.resume=auto").stdout
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for key in ("loss", "val_loss", "lr", "wire_bytes"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    last = [dcp_params(tmp_path / run / "checkpoints" / f"step_{steps:08d}" / f"replica{r}")
            for run in ("full", "split") for r in (0, 1)]
    for k in last[0]:
        assert torch.equal(last[0][k], last[2][k]) and torch.equal(last[1][k], last[3][k]), k
    assert not all(torch.equal(last[0][k], last[1][k]) for k in last[0])  # two replicas


@pytest.mark.extended
def test_hsdp_through_the_trainer_resumes_bitwise(tmp_path):
    """4 ranks, sync=ddp on 2 islands of 2 (native HSDP, 2-D mesh, one world-wide dcp/):
    stopped after step 3 and resumed, every metric and the parameters equal the uninterrupted
    run's; wire_bytes holds the replicate all-reduce of this rank's gradient shard."""
    args = ["experiment=tiny", "dist.nproc=4", "engine=fsdp2", "engine.shard_group_size=2", "trainer.max_steps=6",
            "trainer.eval_every=3", "trainer.checkpoint_every=3", "data.eval_batches=4", "optim.grad_clip=0"]
    POOLS.train(*args, f"hydra.run.dir={tmp_path}/full")
    POOLS.train(*args, f"hydra.run.dir={tmp_path}/split", "trainer.stop_after=3")
    POOLS.train(*args, f"hydra.run.dir={tmp_path}/split", "trainer.resume=auto")
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "val_loss", "lr", "wire_bytes"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    # the replicate group's all-reduce of this rank's n/2 fp32 gradient elements is the dense
    # reference (an fp32 all-reduce of the shard across R = 2 replicas): the same bytes
    assert all(r["wire_bytes"] - r["control_bytes"] == r["dense_bytes"] > 0 for r in a), a[-1]
    x, y = (dcp_params(tmp_path / run / "checkpoints" / "step_00000006" / "dcp") for run in ("full", "split"))
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.extended
def test_outer_state_resumes_under_another_island_size(tmp_path):
    """sync=diloco comm=topk on 2 islands of 2, stopped after step 2 (one round), resumed with
    islands of 1: at the same world size (4 islands: another replica count) and on 2 ranks (2
    islands: the same replica count). The rank files hold the old shard sizes, so the trainer
    must take the engine's resharded state (loading the rank files' fails on the shapes): both
    runs finish, round 2 ends at step 4, and the engine says in one line what it did with the
    error feedback (tensors: tests/test_fsdp2_outer.py)."""
    import shutil

    args = ["experiment=tiny", "engine=fsdp2", "sync=diloco", "sync.local_steps=2", "comm=topk",
            "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2", "data.eval_batches=4"]
    POOLS.train(*args, "dist.nproc=4", "engine.shard_group_size=2", "trainer.stop_after=2",
                f"hydra.run.dir={tmp_path}/same")
    shutil.copytree(tmp_path / "same", tmp_path / "fewer")
    for run, nproc, why in (("same", 4, "error feedback reset (2 replicas saved, 4 now)"),
                            ("fewer", 2, "error feedback resharded")):
        out = POOLS.train(*args, f"dist.nproc={nproc}", "engine.shard_group_size=1", "trainer.resume=auto",
                          f"hydra.run.dir={tmp_path}/{run}").stdout
        said = [line for line in out.splitlines() if "outer loop's state resharded" in line]
        assert len(said) == 1 and why in said[0], out
        assert ("per-rank state reset (RNG streams)" in out) == (nproc == 2), out
        rows = metrics(tmp_path / run)
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["outer_round"] == 2, rows[-1]
