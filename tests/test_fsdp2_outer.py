"""engine=fsdp2 across islands (HSDP layout, 4 ranks, CPU, gloo, pooled ranks): what the
outer loop does on local shards at S > 1, against the same strategy on two unsharded replicas.

- streaming fragments (sync.fragments=2, a fragment in flight) with chunk Top-K + error
  feedback on chunk-aligned shards: every rank's whole parameters bitwise == the same
  strategy run by ``engine=ddp``'s code on two unsharded replicas (each replica's gradient the
  mean of its island's two ranks, as FSDP2's reduce-scatter computes it);
- resumed with a fragment in flight (same layout): every metric and each island's parameters
  bitwise == the uninterrupted run.
"""
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_ranks
from pool import POOLS
from test_fsdp2 import ENGINE, INNER, OUTER, assert_islands_resume_bitwise, make_model, metrics

# Streaming DiLoCo: 2 fragments (one per block), H = 4, each fragment's average overlaps 1 step
STREAMING = {**OUTER, "local_steps": 4, "fragments": 2, "fragment_delay": 1}
# chunks of 8 elements: every local shard of the test model (rows of 16 or 64, 21 = 11 + 10
# embedding rows) is a whole number of chunks, so per-shard chunk Top-K == per-tensor; values
# in bf16 (bits=16): the 2-bit code book is one per tensor, so one per local shard under FSDP2
# (measured: not bitwise, 0.06 apart on the embedding after 7 steps)
CHUNK = {"name": "chunk_topk", "chunk": 8, "k": 2, "bits": 16, "feedback": "ef", "min_numel": 8}


def outer_run(world, model, strategy, steps, island_batches):
    """Inner SGD steps of ``model`` (its gradient: the mean of ``island_batches(step)``'s
    gradients, as FSDP2's reduce-scatter inside an island), each followed by the strategy."""
    from types import SimpleNamespace

    opt = torch.optim.SGD(model.parameters(), lr=INNER["lr"], momentum=INNER["momentum"])
    strategy.bind_optimizer(SimpleNamespace(optimizer=opt))  # sync.moment1_every: its momentum buffers
    for step in range(steps):
        grads = []
        for b in island_batches(step):
            model.zero_grad()
            model(**b).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, ga, gb in zip(model.parameters(), *grads):
            p.grad = ga / 2 + gb / 2
        opt.step()
        strategy.after_step(step)


def streaming_run(rank, world_size, steps, comm=CHUNK, outer=STREAMING):
    """Rank ``rank`` of 2 islands of 2 (engine=fsdp2, the loop's calls by hand), then the same
    strategy on two unsharded replicas (``DataParallel`` over ranks {j, j + 2}: rank r plays
    replica r // 2, whose gradient is the mean of its island's two ranks')."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.param_space import DataParallel
    from thinwire.comm.sync import build_sync
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    from test_sync import B, batch

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    comm = OmegaConf.create(comm)
    model, meter = make_model(), WireMeter()
    engine = build_engine(OmegaConf.create(ENGINE), model, world, meter, comm, grad_sync=False)
    plugin = engine.attach(SGDPlugin(OmegaConf.create(INNER), model, max_steps=steps), B)
    strategy = build_sync(OmegaConf.create(outer), world, meter, model, comm, replicas=engine.replicas)
    strategy.bind_optimizer(plugin)
    for step in range(steps):
        plugin.compute(engine.forward_model, batch(step, rank, world_size))
        plugin.apply(step)
        strategy.after_step(step)
    out = {"fsdp2": {k: v.full_tensor().clone() for k, v in model.state_dict().items()},
           "in_flight": sorted(strategy.flights), "feedback": strategy.averager.state_dict().get("feedback")}
    strategy.close()
    pairs = [dist.new_group([j, j + 2]) for j in range(2)]
    pairs2 = [dist.new_group([j, j + 2]) for j in range(2)]
    ref, island = make_model(), rank // 2
    replicas = DataParallel(world, group=pairs[rank % 2], cross_group=pairs2[rank % 2])
    strategy = build_sync(OmegaConf.create(outer), world, WireMeter(), ref, comm, replicas=replicas)
    outer_run(world, ref, strategy, steps, lambda s: [batch(s, r, world_size) for r in (2 * island, 2 * island + 1)])
    out["ref"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    out["ref_in_flight"] = sorted(strategy.flights)
    strategy.close()
    return out


@pytest.mark.extended
def test_streaming_across_islands_equals_unsharded_replicas(tmp_path):
    """4 ranks, islands {0,1} {2,3}; sync=local with 2 fragments, a 1-step delay (Streaming
    DiLoCo), outer Nesterov, chunk Top-K + error feedback on chunk-aligned local shards; 7
    steps (fragment 1 in flight at the end): every rank's whole parameters bitwise == the same
    strategy on two unsharded replicas; the islands differ; residuals are per local shard."""
    results = run_ranks(streaming_run, 4, tmp_path, 7)
    for rank, res in enumerate(results):
        assert res["in_flight"] == res["ref_in_flight"] == [1]
        for k, v in res["ref"].items():
            assert torch.equal(res["fsdp2"][k], v), (rank, k)
        assert all(torch.equal(v, results[rank ^ 1]["fsdp2"][k]) for k, v in res["fsdp2"].items())
        assert res["feedback"] and all(x.abs().sum() > 0 for bufs in res["feedback"].values() for x in bufs.values())
    assert not all(torch.equal(results[0]["fsdp2"][k], results[2]["fsdp2"][k]) for k in results[0]["fsdp2"])
    emb = [results[r]["feedback"]["tok_emb.weight"]["e"].numel() for r in (0, 1)]
    assert emb == [11 * 16, 10 * 16], emb  # uneven shards: 21 rows as 11 + 10


@pytest.mark.extended
def test_streaming_across_islands_resumes_bitwise_with_a_fragment_in_flight(tmp_path):
    """4 ranks, 2 islands of 2, sync=diloco with 2 fragments and a 1-step delay (H = 4:
    fragment 1 launches at step 3 and merges at 4), int8 outer average: stopped after step 3
    (fragment 1 in flight) and resumed, every metric and each island's step-6 parameters
    bitwise == the uninterrupted run."""
    args = ["experiment=tiny", "dist.nproc=4", "engine=fsdp2", "engine.shard_group_size=2", "sync=diloco",
            "sync.local_steps=4", "sync.fragments=2", "sync.fragment_delay=1", "comm=int8", "trainer.max_steps=6",
            "trainer.eval_every=3", "trainer.checkpoint_every=3", "data.eval_batches=4"]
    assert_islands_resume_bitwise(tmp_path, args, 3, 6)
    assert os.path.isdir(tmp_path / "split" / "checkpoints" / "step_00000003" / "replica1")


# -- the outer loop's state resharded on resume (another island size) ----------------------
CO2 = {**OUTER, "name": "co2", "local_steps": 2, "staleness_penalty": 0.5}
EF = {"name": "topk", "ratio": 0.25, "feedback": "ef", "min_numel": 8}


def outer_engine(rank, world_size, size, overlap):
    """engine=fsdp2 on islands of ``size`` ranks, SGD inner, sync=co2 (``overlap``) with Top-K +
    error feedback on the outer average, bound as the trainer binds them."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.sync import build_sync
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    model, meter, comm = make_model(), WireMeter(), OmegaConf.create(EF)
    engine = build_engine(OmegaConf.create({**ENGINE, "shard_group_size": size}), model, world, meter, comm,
                          grad_sync=False)
    plugin = engine.attach(SGDPlugin(OmegaConf.create(INNER), model, max_steps=8), 4)
    strategy = build_sync(OmegaConf.create({**CO2, "overlap": overlap}), world, meter, model, comm,
                          replicas=engine.replicas)
    engine.bind_sync(strategy)
    return engine, plugin, strategy


def whole_outer_state(engine, strategy) -> dict:
    """Every per-piece tensor of the strategy's state as the whole tensor of its island."""
    from thinwire.trainer import fsdp2_outer_state, fsdp2_shards

    state = strategy.state_dict()
    pieces = fsdp2_outer_state.pieces(state, strategy.space.names, strategy.space.sizes, strategy.plan.fragments)
    whole = {k: v.full_tensor().clone() for k, v in fsdp2_shards.as_dtensors(pieces, engine.module).items()}
    return {"tensors": whole, "round": state["round"], "flights": sorted(state["flights"]),
            "last_step": sorted(state["last_step"]), "sizes": list(strategy.space.sizes)}


def outer_save(rank, world_size, root, overlap, steps):
    """2 islands of 2, ``steps`` steps (H = 2: a mean in flight), checkpointed as the trainer
    does (the rank files, then the engine's DCP files); the state's whole tensors."""
    from test_sync import batch

    engine, plugin, strategy = outer_engine(rank, world_size, 2, overlap)
    for step in range(steps):
        plugin.compute(engine.forward_model, batch(step, rank, world_size))
        plugin.apply(step)
        strategy.after_step(step)
    path = os.path.join(root, overlap)
    os.makedirs(path, exist_ok=True)
    torch.save({"sync": strategy.state_dict()}, os.path.join(path, f"rank{rank:05d}.pt"))
    engine.save_extra(path)
    out = whole_outer_state(engine, strategy)
    strategy.close()
    return out


def outer_load(rank, world_size, size, root, overlap):
    """Islands of ``size`` ranks resuming the 2x2 checkpoint (load_extra, as the trainer does)."""
    import contextlib
    import io

    engine, plugin, strategy = outer_engine(rank, world_size, size, overlap)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        took = engine.load_extra(os.path.join(root, overlap), same_world=world_size == 4)
    out = {**whole_outer_state(engine, strategy), "took": took, "said": said.getvalue()}
    strategy.close()
    return out


@pytest.mark.extended
@pytest.mark.parametrize("overlap", ["stale", "eager"])
def test_outer_state_reshards_to_another_island_size(tmp_path, overlap):
    """sync=co2 (H = 2, 5 steps; stale: round 2's mean in flight, round 1's anchor step kept
    for the staleness gap; eager: the start s_i), Top-K + error feedback, saved on 2 islands of 2.
    Resumed as 2 islands of 1 (2 ranks): every tensor of the outer loop's state (anchor, outer
    momentum, snapshot and mean in flight, last step, residuals) is the saved island's whole
    tensor, exactly. As 1 island of 4 (4 ranks, another replica count): the same, replica 0's,
    with the error feedback reset and one warning line saying so."""
    saved = run_ranks(outer_save, 4, tmp_path, str(tmp_path), overlap, 5)
    keys = saved[0]["tensors"]
    kinds = {k.split("/")[0] for k in keys}
    stale = overlap == "stale"  # eager applies a mean to the consensus when it is waited for: none in flight
    assert {"anchor", "outer:momentum_buffer", "feedback:e"} <= kinds, kinds
    assert {"snapshot0", "mean0", "last0"} <= kinds if stale else "start" in kinds, kinds
    flights = [0] if stale else []
    assert saved[0]["flights"] == flights and saved[0]["round"] == 2
    assert not all(torch.equal(v, saved[2]["tensors"][k]) for k, v in keys.items())  # the islands differ
    for size, world in ((1, 2), (4, 4)):
        loaded = run_ranks(outer_load, world, tmp_path, size, str(tmp_path), overlap)
        for rank, got in enumerate(loaded):
            island = saved[2 * rank if size == 1 else 0]
            assert got["took"] is True and got["round"] == 2 and got["flights"] == flights
            want = {k: v for k, v in island["tensors"].items() if size == 1 or not k.startswith("feedback:")}
            assert got["tensors"].keys() == want.keys(), (size, set(got["tensors"]) ^ set(want))
            for k, v in want.items():
                assert torch.equal(got["tensors"][k], v), (size, rank, k)
        said = loaded[0]["said"].strip().splitlines()
        assert len(said) == 1, said
        assert ("error feedback resharded" if size == 1 else "error feedback reset (2 replicas saved, 1 now)") \
            in said[0], said
    assert saved[0]["sizes"][0] == 11 * 16 and loaded[0]["sizes"][0] == 6 * 16  # torch.chunk: 6, 6, 6, 3 rows


# -- inner-moment averaging (DES-LOC) over the replicate group, on local shards --------------
@pytest.mark.extended
def test_moments_across_islands_equal_unsharded_replicas(tmp_path):
    """4 ranks, 2 islands of 2: sync=co2 (stale, H = 2) with sync.moment1_every=1 (the inner
    SGD's momentum buffers averaged across islands at every round's end, on a group of their own
    while co2's average is in flight on the cross group), chunk Top-K + EF, 7 steps: every rank's
    whole parameters bitwise == the same strategy on two unsharded replicas without the staleness
    penalty; without the moment averaging they differ (it acts). With CO2's penalty (0.5) equal
    to 1e-6: its per-layer norms at S > 1 add the shards' fp64 squares over the island, where
    unsharded replicas take one fp32 norm per tensor (measured: 4e-9 apart after 7 steps)."""
    outer = {**CO2, "staleness_penalty": 0.0, "moment1_every": 1}
    results = run_ranks(streaming_run, 4, tmp_path, 7, CHUNK, outer)
    plain = run_ranks(streaming_run, 4, tmp_path, 7, CHUNK, {**outer, "moment1_every": 0})
    penalised = run_ranks(streaming_run, 4, tmp_path, 7, CHUNK, {**outer, "staleness_penalty": 0.5})
    for rank, res in enumerate(results):
        for k, v in res["ref"].items():
            assert torch.equal(res["fsdp2"][k], v), (rank, k)
            torch.testing.assert_close(penalised[rank]["fsdp2"][k], penalised[rank]["ref"][k], rtol=1e-6, atol=1e-7)
        assert not all(torch.equal(v, plain[rank]["fsdp2"][k]) for k, v in res["fsdp2"].items())
    assert not all(torch.equal(results[0]["fsdp2"][k], results[2]["fsdp2"][k]) for k in results[0]["fsdp2"])


# -- optim=demo on local shards, all-gathering over the replicate group ----------------------
def demo_model():
    """A tiny GPT whose every dimension is a multiple of 8, in whole and in halves (vocab 32,
    16 positions, width 16): with optim.chunk=8 each local shard's DCT tiles are 8 x 8 (1-D:
    8), the unsharded tensor's tiles, and its chunks a contiguous run of the tensor's."""
    from thinwire.data.base import DataInfo
    from thinwire.models.gpt import build_gpt

    torch.manual_seed(0)
    return build_gpt(info=DataInfo("tokens", 0, vocab_size=32), n_layer=2, n_head=2, n_embd=16, block_size=16)


def demo_batch(step, rank):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(0, 32, (4 * 4, 16), generator=g)[rank * 4:(rank + 1) * 4]
    return {"x": x, "y": torch.roll(x, -1, dims=1)}


def own_exchange_cfg(optim):
    """optim=demo: Signum, chunk 8, k 4, bf16 values; adam1bit: 2 dense steps, then sign1
    with blocks of 8; "+clip": optim.grad_clip=0.05."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from thinwire.optim.adam1bit import OneBitAdamOptions
    from thinwire.optim.demo import DeMoOptions
    from thinwire.optim.plugins import OptimConfig

    own = {"demo": (DeMoOptions, {"chunk": 8, "k": 4}), "adam1bit": (OneBitAdamOptions, {"freeze_step": 2,
                                                                                          "block_size": 8})}
    options, keys = own[optim.split("+")[0]]
    clip = 0.05 if optim.endswith("+clip") else 0.0
    return SimpleNamespace(**{**asdict(OptimConfig()), **asdict(options()), "name": optim, "lr": 0.01,
                              "weight_decay": 0.1, "schedule": "constant", "grad_clip": clip, **keys})


def own_exchange_run(rank, world_size, steps, optim):
    """``optim`` (:func:`own_exchange_cfg`) on 2 islands of 2 (the loop's calls by hand), then
    on two unsharded replicas: rank r plays replica r // 2 (gradient: the mean of its island's
    two ranks'), exchanging over ranks {j, j + 2}."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.optim.plugins import OPTIMIZERS
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    cfg, plugin_cls = own_exchange_cfg(optim), OPTIMIZERS.get(optim.split("+")[0], "optim")
    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    model, meter = demo_model(), WireMeter()
    engine = build_engine(OmegaConf.create(ENGINE), model, world, meter, OmegaConf.create({"name": "none"}),
                          grad_sync=False)
    plugin = engine.attach(plugin_cls(cfg, model, max_steps=steps, world=world, meter=meter), 4)
    norms = []
    for step in range(steps):
        plugin.compute(engine.forward_model, demo_batch(step, rank))
        norms.append(plugin.apply(step).get("grad_norm"))
    out = {"fsdp2": {k: v.full_tensor().clone() for k, v in model.state_dict().items()},
           "tiles": [t.tile for t in getattr(plugin, "tiles", [])], "norms": norms}
    pairs = [dist.new_group([j, j + 2]) for j in range(2)]
    ref, island = demo_model(), rank // 2
    ref_plugin = plugin_cls(cfg, ref, max_steps=steps, world=world, meter=WireMeter())
    ref_plugin.exchange_over(SimpleNamespace(cross_group=pairs[rank % 2], cross_group2=None, shard_group=None))
    for step in range(steps):
        grads = []
        for r in (2 * island, 2 * island + 1):
            ref.zero_grad()
            ref(**demo_batch(step, r)).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for p, ga, gb in zip(ref.parameters(), *grads):
            p.grad = ga / 2 + gb / 2
        out.setdefault("ref_norms", []).append(ref_plugin.apply(step).get("grad_norm"))
    out["ref"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    out["ref_tiles"] = [t.tile for t in getattr(ref_plugin, "tiles", [])]
    return out


@pytest.mark.extended
@pytest.mark.parametrize("optim", ["demo", "adam1bit", "adam1bit+clip"])
def test_own_exchange_across_islands_equals_unsharded_replicas(tmp_path, optim):
    """4 ranks, 2 islands of 2, 4 steps of optim=demo (Signum) | adam1bit (2 dense steps, then
    1-bit momentum) on local shards, exchanging over the replicate group: every rank's whole
    parameters bitwise == the same plugin on two unsharded replicas (each replica's gradient
    its island's mean), on a model where every shard's rows are a whole number of the tensor's
    8 x 8 DCT tiles (DeMo) and of 8-value blocks per two-phase chunk (adam1bit); all ranks
    equal (the update is the same everywhere). adam1bit with optim.grad_clip (clipping every
    step): the island's norm adds the shards' fp64 squares, so the norms equal the unsharded
    ones to 1e-5 and the parameters to 1e-3 relative, not bitwise (measured: one element of a
    LayerNorm weight 1.1e-4 apart after 4 steps: Adam's m / sqrt(v) amplifies the last bits)."""
    results = run_ranks(own_exchange_run, 4, tmp_path, 4, optim)
    for rank, res in enumerate(results):
        assert res["tiles"] == res["ref_tiles"]  # per-shard tiles == the tensor's
        for k, v in res["ref"].items():
            if optim.endswith("+clip"):
                torch.testing.assert_close(res["fsdp2"][k], v, rtol=1e-3, atol=1e-5)
            else:
                assert torch.equal(res["fsdp2"][k], v), (rank, k)
            assert torch.equal(res["fsdp2"][k], results[0]["fsdp2"][k]), (rank, k)
        if optim.endswith("+clip"):
            assert all(n > 0.05 for n in res["norms"]), res["norms"]  # clipped at every step
            assert res["norms"] == pytest.approx(res["ref_norms"], rel=1e-5), (res["norms"], res["ref_norms"])
    assert not torch.equal(results[0]["fsdp2"]["tok_emb.weight"], demo_model().tok_emb.weight.detach())


OWN_EXCHANGE = {"demo": ["optim=demo"], "adam1bit": ["optim=adam1bit", "optim.freeze_step=2"]}


@pytest.mark.extended
@pytest.mark.parametrize("optim", list(OWN_EXCHANGE))
def test_own_exchange_on_islands_of_one_equals_ddp_and_resumes(tmp_path, optim):
    """2 ranks, optim=demo (Signum) | adam1bit (2 dense steps, then 1-bit momentum):
    engine=fsdp2 with islands of 1 (each local shard the whole tensor, the exchange over both
    ranks), stopped after step 3 and resumed (the plugin's state from the engine's
    optim{rank}.pt), gives the uninterrupted engine=ddp run's every metric bitwise; resuming it
    under another island size is refused in one line."""
    from pool import JobFailed

    common = ["experiment=tiny", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
              "data.eval_batches=4", "dist.nproc=2", "optim.grad_clip=0", *OWN_EXCHANGE[optim]]
    POOLS.train(*common, "engine=ddp", f"hydra.run.dir={tmp_path}/ddp")
    fsdp = [*common, "engine=fsdp2", f"hydra.run.dir={tmp_path}/fsdp2"]
    POOLS.train(*fsdp, "engine.shard_group_size=1", "trainer.stop_after=3")
    assert (tmp_path / "fsdp2" / "checkpoints" / "step_00000003" / "optim00001.pt").exists()
    assert "resumed from" in POOLS.train(*fsdp, "engine.shard_group_size=1", "trainer.resume=auto").stdout
    d, f = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in f] == list(range(1, 7))
    assert max(r["compression_ratio"] for r in d) > 1.5
    for key in ("loss", "val_loss", "lr", "wire_bytes", "compression_ratio"):
        assert [r.get(key) for r in f] == [r.get(key) for r in d], key
    with pytest.raises(JobFailed, match=r"engine.shard_group_size=2: .*not resharded: resume with "
                                        r"engine.shard_group_size=1"):
        POOLS.train(*fsdp, "engine.shard_group_size=2", "trainer.max_steps=9", "trainer.resume=auto")


def empty_shard_run(rank, world_size):
    """optim=demo on one island of 4 over a 2-row weight: ranks 2 and 3 hold none of it."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.errors import ConfigError
    from thinwire.optim.demo import DeMoPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    model = torch.nn.Sequential(torch.nn.Linear(16, 2, bias=False))
    build_engine(OmegaConf.create({**ENGINE, "shard_group_size": 4}), model, world, WireMeter(),
                 OmegaConf.create({"name": "none"}), grad_sync=False)
    try:
        DeMoPlugin(own_exchange_cfg("demo"), model, max_steps=1, world=world)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.extended
def test_own_exchange_refuses_an_empty_local_shard(tmp_path):
    """A parameter with fewer rows than an island's ranks leaves some rank an empty local
    shard: optim=demo refuses it in one line naming engine.shard_group_size and the parameter,
    on every rank (from the global shape, so no rank goes on alone)."""
    said = run_ranks(empty_shard_run, 4, tmp_path)
    assert all(s and s.startswith("engine.shard_group_size: 0.weight has fewer rows") and "\n" not in s
               for s in said), said
