"""engine=deepspeed: ZeRO-1/2 under thinwire's loop (CPU, gloo, a torch optimizer, so
nothing JIT-compiles): equals engine=ddp, skips non-finite steps like it, resumes from
its own sharded checkpoint, and rejects what it does not support with exit status 2."""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli, run_ranks

pytest.importorskip("deepspeed")

VOCAB, BLOCK, B, STEPS, NAN_STEP = 20, 8, 4, 6, 3


def make_model():
    from thinwire.data.base import DataInfo
    from thinwire.models.gpt import build_gpt

    torch.manual_seed(0)
    return build_gpt(info=DataInfo("tokens", 0, vocab_size=VOCAB), n_layer=2, n_head=2, n_embd=16, block_size=BLOCK)


def batch(step, rank):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, VOCAB, (2 * B, BLOCK), generator=g)[rank * B:(rank + 1) * B]
    return {"x": x, "y": torch.roll(x, -1, dims=1)}


# DeepSpeed's comms logger names the collectives it ran; thinwire's table charges them as
KIND = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "reduce": "reduce_scatter",
        "reduce_scatter_tensor": "reduce_scatter", "broadcast": "broadcast"}


def measured_bytes(world_size):
    """Bytes this rank sent so far by DeepSpeed's own count (scalar flags and norms left out)."""
    from deepspeed.comm import comms_logger

    from thinwire.comm.accounting import collective_bytes

    return sum(rec[0] * collective_bytes(KIND[op], size, 1, world_size)
               for op, sizes in comms_logger.comms_dict.items() for size, rec in sizes.items() if size > 16)


def train(rank, world_size, engine_name, stage, zero_extra=None):
    """What the loop does per step, with rank 0's gradients poisoned in step NAN_STEP."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.optim.plugins import AdamWPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", None)
    model, meter = make_model(), WireMeter()
    cfg = OmegaConf.create({"name": engine_name, "bucket_cap_mb": 0.01, "gradient_as_bucket_view": True,
                            "find_unused_parameters": False,
                            "deepspeed": {"zero_optimization": {"stage": stage, **(zero_extra or {})},
                                          "comms_logger": {"enabled": True, "prof_all": True}}})
    optim = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
                              "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "decay_start": None, "grad_clip": 0.5})
    engine = build_engine(cfg, model, world, meter, OmegaConf.create({"name": "none"}), grad_sync=True)
    plugin = engine.attach(AdamWPlugin(optim, model, max_steps=STEPS), B)
    meter.take_step()
    losses, wire, norms, measured = [], [], [], []
    before = measured_bytes(world_size) if engine_name == "deepspeed" else 0
    for step in range(STEPS):
        handles = [p.register_hook(lambda g: torch.full_like(g, float("nan"))) for p in model.parameters()] \
            if (rank == 0 and step == NAN_STEP) else []
        loss = plugin.compute(engine.forward_model, batch(step, rank))
        for h in handles:
            h.remove()
        flag = torch.tensor([0.0 if plugin.local_finite() else 1.0])
        dist.all_reduce(flag)
        if flag.item() == 0:
            norms.append(plugin.apply(step)["grad_norm"])
            engine.commit()
        else:
            plugin.discard()
            engine.discard()
        losses.append(float(loss))
        wire.append(meter.take_step().get("data", 0))
        if engine_name == "deepspeed":
            now = measured_bytes(world_size)
            measured.append(now - before)
            before = now
    # ZeRO shards AdamW's state: this rank holds moments for about half of the elements
    state = sum(s["exp_avg"].numel() for s in (engine.ds.optimizer.optimizer.state.values()
                                                if engine_name == "deepspeed" else plugin.optimizer.state.values()))
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses,
            "wire": wire, "measured": measured, "norms": norms, "numel": engine.numel,
            "state_numel": state}


def ddp_and_zero(rank, world_size):
    """One spawn for the three runs: process start and imports dominate on a busy CPU."""
    return {"ddp": train(rank, world_size, "ddp", 0),
            "zero1": train(rank, world_size, "deepspeed", 1),  # gradients all-reduced (DeepSpeed's default)
            "zero2": train(rank, world_size, "deepspeed", 2, {"use_multi_rank_bucket_allreduce": False})}


def test_zero1_and_zero2_match_ddp_and_skip_nonfinite_steps(tmp_path):
    from thinwire.comm.accounting import collective_bytes

    results = run_ranks(ddp_and_zero, 2, tmp_path)
    for stage in ("zero1", "zero2"):
        for r in results:
            d, z = r["ddp"], r[stage]
            assert len(z["norms"]) == STEPS - 1  # the poisoned step was skipped on both ranks
            torch.testing.assert_close(z["losses"], d["losses"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(z["norms"], d["norms"], rtol=1e-4, atol=1e-6)
            for k, v in d["params"].items():
                torch.testing.assert_close(z["params"][k], v, rtol=1e-5, atol=1e-6)
            # the estimate is what DeepSpeed's comms logger counted, step by step: zero1 all-reduces
            # the fp32 gradients, zero2 reduces each half to its owner; both all-gather fp32
            # parameters after a step; the skipped step reduced gradients but gathered nothing
            assert z["wire"] == z["measured"], stage
            ring = collective_bytes("all_reduce", z["numel"], 4, 2)
            grads = ring if stage == "zero1" else ring // 2
            assert z["wire"] == [grads + ring // 2 if s != NAN_STEP else grads for s in range(STEPS)], stage
        assert results[0]["ddp"]["state_numel"] == results[0]["ddp"]["numel"]
        assert all(abs(r[stage]["state_numel"] - r[stage]["numel"] / 2) < 64 for r in results)
        for k in results[0][stage]["params"]:
            assert torch.equal(results[0][stage]["params"][k], results[1][stage]["params"][k])


# -- local / co2 across ZeRO replica groups: 4 ranks, ZeRO inside {0,1} and {2,3} ------------
def outer_on_zero(rank, world_size, runs):
    """The loop's calls by hand on engine=deepspeed with replica groups of 2: compute, agree
    within the group, apply, sync.after_step; then the evaluated mean."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.sync import build_sync
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import build_engine
    from thinwire.trainer.world import World

    from test_sync import batch as world_batch  # B sequences per rank, world_size * B drawn per step

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group())
    out = {}
    for name, (stage, sync, steps, comm) in runs.items():
        model, meter = make_model(), WireMeter()
        cfg = OmegaConf.create({"name": "deepspeed", "zero_group_size": 2,
                                "deepspeed": {"zero_optimization": {"stage": stage}}})
        comm = OmegaConf.create(comm)
        engine = build_engine(cfg, model, world, meter, comm, grad_sync=False)
        plugin = engine.attach(SGDPlugin(OmegaConf.create(OUTER_SGD), model, max_steps=steps), B)
        strategy = build_sync(OmegaConf.create(sync), world, meter, model, comm, replicas=engine.replicas)
        outer_bytes = []
        for step in range(steps):
            plugin.compute(engine.forward_model, world_batch(step, rank, world_size))
            assert plugin.local_finite()
            plugin.apply(step)
            strategy.after_step(step)
            # ZeRO's own traffic in the group (the estimate of wire_bytes_per_step) left out
            outer_bytes.append(meter.take_step().get("data", 0) - plugin.grad_bytes - plugin.param_bytes)
        strategy.close()
        outer_bytes.append(meter.take_step().get("data", 0))
        with strategy.eval_model() as m:
            mean = {k: v.detach().clone() for k, v in m.state_dict().items()}
        # the outer loop's space is this rank's shard of the fp32 master weights; the module's
        # parameters (ZeRO's flat buffers) hold the same values there
        space, groups = strategy.space, engine.replicas
        module_side = torch.cat([engine.ds.optimizer.bit16_groups_flat[i].chunk(groups.size)[groups.index][o:o + n]
                                 for i, o, n in space.pieces])
        out[name] = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "mean": mean,
                     "master": space.read_flat(), "live": module_side.float(), "outer_bytes": outer_bytes,
                     "numel": engine.numel, "outer_numel": sum(a.numel() for a in strategy.anchor)}
    return out


OUTER_SGD = {"lr": 0.2, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0, "schedule": "constant",
             "warmup_steps": 0, "min_lr_ratio": 1.0, "decay_start": None, "grad_clip": 0.0}
OUTER = {"local_steps": 3, "clip": 0.05, "clip_mode": "norm",
         "outer_optim": {"_target_": "torch.optim.SGD", "lr": 0.8, "momentum": 0.6, "nesterov": True}}


@pytest.mark.extended  # ~10 s; ZeRO-1/2 against DDP stays in the default tier
def test_local_and_co2_across_zero_replica_groups_equal_two_worker_reference(tmp_path):
    """ZeRO-1 + local and ZeRO-2 + co2 at 4 ranks (2 groups x 2) against the single-process
    2-worker reference of tests/test_sync.py, where worker i's batch is its group's two
    batches together (ZeRO averages the group's gradients); int8 two-phase pseudo-gradients
    across groups exercise the comm layer on the cross-group links."""
    from test_sync import batch as world_batch, co2_reference

    steps = 9
    runs = {"local": (1, {"name": "local", **OUTER, "staleness_penalty": 0.0}, steps, {"name": "none"}),
            "co2": (2, {"name": "co2", **OUTER, "staleness_penalty": 1.0}, steps, {"name": "none"}),
            "co2-int8": (2, {"name": "co2", **OUTER, "staleness_penalty": 0.0}, 6,
                         {"name": "int8", "collective": "two_phase", "feedback": "none", "min_numel": 64})}
    results = run_ranks(outer_on_zero, 4, tmp_path, runs)

    def group_batch(step, i):
        parts = [world_batch(step, r, 4) for r in (2 * i, 2 * i + 1)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    for name, stale, penalty in (("local", False, 0.0), ("co2", True, 1.0)):
        ref = co2_reference(2, steps, OUTER["local_steps"], OUTER_SGD["lr"], OUTER_SGD["momentum"],
                            OUTER["outer_optim"]["lr"], OUTER["outer_optim"]["momentum"], penalty, OUTER["clip"], stale=stale,
                            batch_of=group_batch)
        for rank in range(4):
            for k, v in ref[rank // 2].items():
                torch.testing.assert_close(results[rank][name]["params"][k], v, rtol=1e-4, atol=1e-5)
            # the module's parameters are the fp32 master weights (fp32 training); anchor and
            # outer momentum are sharded: about half of the model per rank
            res = results[rank][name]
            assert torch.equal(res["master"], res["live"])
            assert abs(res["outer_numel"] - res["numel"] / 2) < 64, (res["outer_numel"], res["numel"])
        for k in ref[0]:  # evaluated: the mean over the replicas, identical on every rank
            torch.testing.assert_close(results[0][name]["mean"][k], (ref[0][k] + ref[1][k]) / 2,
                                       rtol=1e-4, atol=1e-5)
            assert all(torch.equal(results[r][name]["mean"][k], results[0][name]["mean"][k]) for r in range(4))
    # int8 pseudo-gradients: replicas of a group stay identical; each of the 2 rounds launches the
    # int8 two-phase average of this rank's shard (n/2 elements) across the 2 groups, about n/2
    # bytes; the second consumes the first and all-gathers the updated fp32 module parameters
    # inside the group (2n bytes)
    for rank in (1, 3):
        p0, p1 = results[rank - 1]["co2-int8"]["params"], results[rank]["co2-int8"]["params"]
        assert all(torch.equal(p0[k], p1[k]) for k in p0)
    n = results[0]["co2-int8"]["numel"]
    total = sum(results[0]["co2-int8"]["outer_bytes"])
    assert 2 * n + 2 * 0.5 * n <= total <= 2 * n + 2 * 0.6 * n, (total, n, results[0]["co2-int8"]["outer_bytes"])


BASE = ["engine=deepspeed", "experiment=tiny", "trainer.max_steps=12", "trainer.checkpoint_every=4",
        "trainer.eval_every=6", "model.dropout=0.1", "optim.grad_clip=0.5"]


def metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def stop_and_resume(rank, world_size, root, stage, extra=()):
    """The trainer in-process, three times on one process group: the whole run, a run stopped
    after step 6, and its continuation from the newest checkpoint (trainer.resume=auto)."""
    import torch.distributed as dist

    from thinwire.config import compose
    from thinwire.trainer.loop import train
    from thinwire.trainer.world import World

    world = World(rank, world_size, rank, torch.device("cpu"), "gloo", dist.new_group() if extra else None)
    base = [*BASE, f"engine.deepspeed.zero_optimization.stage={stage}", *extra]
    train(compose([*base, f"hydra.run.dir={root}/full"]), world)
    train(compose([*base, f"hydra.run.dir={root}/split", "trainer.stop_after=6"]), world)
    # DeepSpeed's loader unpickles its files: resuming needs the explicit trust flag
    train(compose([*base, f"hydra.run.dir={root}/split", "trainer.resume=auto", "trainer.trust_checkpoints=true"]),
          world)


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_from_deepspeed_checkpoint_continues_bitwise(tmp_path, stage):
    run_ranks(stop_and_resume, 2, tmp_path, str(tmp_path), stage)
    full, split = tmp_path / "full", tmp_path / "split"
    ckpt = split / "checkpoints" / "step_00000006"
    assert (ckpt / "COMPLETE").exists()
    assert {f.name for f in (ckpt / "deepspeed").iterdir()} >= {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == list(range(1, 13))
    for key in ("loss", "val_loss", "grad_norm", "lr"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    pa = torch.load(full / "checkpoints" / "step_00000012" / "common.pt", weights_only=False)["model"]
    pb = torch.load(split / "checkpoints" / "step_00000012" / "common.pt", weights_only=False)["model"]
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.mark.extended  # 4 ranks, twice; the stage-1/2 resume stays in the default tier
@pytest.mark.parametrize("overlap", ["stale", "eager"])
def test_co2_across_zero_replica_groups_resumes_bitwise(tmp_path, overlap):
    """4 ranks, ZeRO-2 inside {0,1} and {2,3}, co2 across them (H=4, so step 6 is mid-round
    with round 1's average in flight), AdamW, bf16 parameters (the outer loop works on the
    fp32 master weights): each group's DeepSpeed files in its own directory, every rank's
    parameters and the metrics equal to the uninterrupted run. Eager: the consensus and the
    rank's own anchor are shards of the fp32 master weights too."""
    extra = ("sync=co2", "sync.local_steps=4", "engine.zero_group_size=2", "engine.deepspeed.bf16.enabled=true",
             f"sync.overlap={overlap}")
    run_ranks(stop_and_resume, 4, tmp_path, str(tmp_path), 2, extra)
    full, split = tmp_path / "full", tmp_path / "split"
    ckpt = split / "checkpoints" / "step_00000006"
    for g in (0, 1):
        assert {f.name for f in (ckpt / f"replica{g}" / "deepspeed").iterdir()} >= {
            "mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == list(range(1, 13))
    for key in ("loss", "val_loss", "lr", "wire_bytes"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    last = [torch.load(full / "checkpoints" / "step_00000012" / f"rank{r:05d}.pt", weights_only=False)["model"]
            for r in range(4)]
    for r in range(4):
        pb = torch.load(split / "checkpoints" / "step_00000012" / f"rank{r:05d}.pt", weights_only=False)["model"]
        assert all(torch.equal(last[r][k], pb[k]) for k in pb), r
    assert all(v.dtype == torch.bfloat16 for v in last[0].values() if v.is_floating_point())
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])       # one replica
    assert not all(torch.equal(last[0][k], last[2][k]) for k in last[0])   # two replicas


CONTRACT = {"step", "loss", "lr", "step_time_s", "comm_wait_s", "wire_bytes", "dense_bytes", "tokens_per_s"}


@pytest.mark.extended  # two CLI launches with DeepSpeed's start-up: ~23 s
@pytest.mark.slow
def test_self_launched_then_resumed_under_torchrun(tmp_path):
    """Both launchers: thinwire-train starts its workers and stops after step 4 (bf16
    gradients on the wire); torchrun continues the run from that checkpoint."""
    args = [*BASE, "trainer.max_steps=8", "engine.deepspeed.communication_data_type=bf16",
            "engine.deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=false", f"hydra.run.dir={tmp_path}"]
    p = run_cli(*args, "dist.nproc=2", "trainer.stop_after=4")
    assert p.returncode == 0, p.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "thinwire.train"]
    p = run_cli(*args, "trainer.resume=auto", "trainer.trust_checkpoints=true", launcher=torchrun)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert CONTRACT <= r.keys(), CONTRACT - r.keys()
        # bf16 reduce to owners + fp32 all-gather: 3/4 of the fp32 all-reduce, plus the control
        # packet (the evaluation's 16-byte reduction is eval_bytes, not wire_bytes)
        data = r["wire_bytes"] - r["control_bytes"]
        assert data == pytest.approx(0.75 * r["dense_bytes"], abs=2)
    assert rows[-1]["loss"] < rows[0]["loss"]


REJECTED = [
    (["comm=int8"], "comm=int8"),
    (["comm=topk", "comm.feedback=ef"], "comm=topk"),
    (["sync=co2", "dist.nproc=2", "engine.zero_group_size=2"], "engine.zero_group_size=2"),
    (["sync=local", "dist.nproc=4", "engine.zero_group_size=3"], "engine.zero_group_size=3"),
    (["sync=ddp", "dist.nproc=4", "engine.zero_group_size=2"], "engine.zero_group_size=2"),
    (["optim=mezo"], "optim=mezo"),
    (["engine.deepspeed.zero_optimization.stage=3"], "engine.deepspeed.zero_optimization.stage=3"),
    (["engine.deepspeed.zero_optimization.stage=1", "engine.deepspeed.bf16.enabled=true"],
     "engine.deepspeed.bf16.enabled=True"),
    (["+engine.deepspeed.optimizer.type=Adam"], "engine.deepspeed.optimizer="),
    (["engine.deepspeed.gradient_clipping=2.0", "optim.grad_clip=1.0"], "engine.deepspeed.gradient_clipping=2.0"),
]


@pytest.mark.parametrize("overrides,needle", REJECTED, ids=[" ".join(o) for o, _ in REJECTED])
def test_unsupported_combinations_exit_2_with_one_line(overrides, needle, capsys, tmp_path):
    from thinwire.train import main

    with pytest.raises(SystemExit) as exc:
        main(["engine=deepspeed", "experiment=tiny", *overrides, f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err and "engine=deepspeed works with sync=ddp and comm=none" in err, err
