"""The library API of docs/library.md: every example there is a file of docs/examples/library/,
included verbatim, and run here against an independent reference (a loop that calls
``set_lr`` as the trainer does, plain all-reduce parameter averaging, an uninterrupted run,
the trainer's own plugin / PEFT method)."""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import run_ranks
from thinwire.meter import allreduce_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples", "library")
DOC = os.path.join(REPO, "docs", "library.md")


def example(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def test_the_doc_includes_every_example_verbatim():
    doc = open(DOC).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    files = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert files
    for f in files:
        text = open(os.path.join(EXAMPLES, f)).read()
        assert text in blocks, f"docs/library.md must include docs/examples/library/{f} verbatim"


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- comm_hook: the learning rate followed, per-rank checkpoints ------------------------------
def manual_loop(total_steps: int, set_lr: bool):
    """The example's loop without ``optimizer=``: ``set_lr`` with this step's rate before
    backward, as the trainer's engine does (or never, the unrescaled variant)."""
    from thinwire.comm import comm_hook

    ex = example("example_data")
    model = ex.make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    state, hook = comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024, model=model)
    ddp.register_comm_hook(state, hook)
    for step in range(total_steps):
        x, y = ex.batch(step)
        if set_lr:
            state.set_lr(opt.param_groups[0]["lr"])
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        sched.step()
    return params(model), state.state_dict()


def hook_ranks(rank, world_size, tmp):
    from thinwire.comm import comm_hook

    ex = example("ddp_hook")
    for d in ("full", "resumed"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    dist.barrier()
    model, state, counts = ex.train(8, os.path.join(tmp, "full"))
    ex.train(8, os.path.join(tmp, "resumed"), stop=5)
    resumed, resumed_state, _ = ex.train(8, os.path.join(tmp, "resumed"), start=5)
    manual, manual_state = manual_loop(8, set_lr=True)
    unscaled, _ = manual_loop(8, set_lr=False)
    saved = state.state_dict()
    errors = []
    other, _ = comm_hook("topk", ratio=0.1, feedback="ef", min_numel=1024)
    for bad in (saved, {**saved, "rank": 1 - rank}):
        target = other if bad is saved else comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024)[0]
        try:
            target.load_state_dict(bad)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - the message is what is tested
            errors.append(f"{type(e).__name__}: {e}")
    numel = sum(p.numel() for p in model.parameters())
    return {"model": params(model), "state": saved, "resumed": params(resumed), "resumed_state": resumed_state.state_dict(),
            "manual": manual, "manual_state": manual_state, "unscaled": unscaled, "errors": errors,
            "counts": counts, "numel": numel}


def test_comm_hook_follows_the_schedule_resumes_bitwise_and_refuses_foreign_state(tmp_path):
    from thinwire.meter import allreduce_bytes

    for r in run_ranks(hook_ranks, 2, tmp_path, str(tmp_path)):
        # optimizer=opt gives bit for bit what set_lr before backward (the trainer's call) gives
        assert same(r["model"], r["manual"])
        e, e_manual = r["state"]["aggregator"], r["manual_state"]["aggregator"]
        assert e["feedback"].keys() == e_manual["feedback"].keys() and e["feedback"]
        for name, bufs in e["feedback"].items():
            assert same(bufs, e_manual["feedback"][name])
        assert r["state"]["lr_prev"] == r["manual_state"]["lr_prev"] > 0
        assert not same(r["model"], r["unscaled"])  # the unrescaled variant differs
        assert same(r["model"], r["resumed"])  # per-rank checkpoint: bitwise resume
        config_err, rank_err = r["errors"]
        assert config_err.startswith("ResumeConfigError") and "ratio (0.05 -> 0.1)" in config_err
        assert "\n" not in config_err
        assert rank_err.startswith("ResumeConfigError") and "per rank" in rank_err
        # Top-K 5% of the two big matrices: far fewer bytes than the fp32 all-reduce
        dense = 8 * allreduce_bytes(r["numel"], 2)
        assert 0 < r["counts"].data < 0.3 * dense


# -- OuterLoop: local updates, CO2 ------------------------------------------------------------
def nan_on_rank1_step5(step):
    x, y = example("example_data").batch(step)
    if step == 5 and dist.get_rank() == 1:
        x = x * float("nan")
    return x, y


def reference_local(steps: int, H: int, batch_fn):
    """Local AdamW with plain all-reduce parameter averaging every H steps."""
    ex = example("example_data")
    model = ex.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        x, y = batch_fn(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        if (step + 1) % H == 0:
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data /= dist.get_world_size()
    return params(model)


def local_ranks(rank, world_size):
    ex = example("local_sgd")
    inf = float("inf")
    out = {}
    model, out["val"], out["counts"], _ = ex.train(12, "local", local_steps=4, clip=inf)
    out["local"], out["ref"] = params(model), reference_local(12, 4, example("example_data").batch)
    model, _, _, _ = ex.train(12, "local", batch_fn=nan_on_rank1_step5, local_steps=4, clip=inf)
    out["skip"], out["ref_skip"] = params(model), reference_local(12, 4, nan_on_rank1_step5)
    topk = {"name": "topk", "ratio": 0.1, "feedback": "ef"}
    model, out["co2_val"], out["co2_counts"], _ = ex.train(12, "co2", comm=topk, local_steps=4)
    out["co2"] = params(model)
    _, _, _, ckpt = ex.train(6, "co2", comm=topk, local_steps=4)
    model, out["co2_resumed_val"], _, _ = ex.train(12, "co2", comm=topk, local_steps=4, resume=ckpt)
    out["co2_resumed"] = params(model)
    out["numel"] = sum(p.numel() for p in model.parameters())
    return out


def test_outer_loop_equals_plain_averaging_survives_a_skip_and_resumes_bitwise(tmp_path):
    from thinwire.meter import allreduce_bytes

    r0, r1 = run_ranks(local_ranks, 2, tmp_path)
    for r in (r0, r1):
        for k in r["ref"]:  # a - mean(a - w_i) against mean(w_i): equal up to rounding
            torch.testing.assert_close(r["local"][k], r["ref"][k], rtol=0, atol=1e-6)
            torch.testing.assert_close(r["skip"][k], r["ref_skip"][k], rtol=0, atol=1e-6)
        assert same(r["co2"], r["co2_resumed"]) and r["co2_val"] == r["co2_resumed_val"]
        assert math.isfinite(r["val"])
        # comm=none: one exact fp32 all-reduce per round (3 rounds), one 4-byte flag each
        assert r["counts"].data == 3 * allreduce_bytes(r["numel"], 2)
        assert r["counts"].control == 3 * 4 and r["counts"].eval == allreduce_bytes(r["numel"], 2)
        assert 0 < r["co2_counts"].data < 0.5 * 3 * allreduce_bytes(r["numel"], 2)
    assert same(r0["local"], r1["local"])  # identical after the last round
    assert not same(r0["skip"], r0["local"])  # the skipped step changed the result, nothing hung


def test_outer_loop_bad_input_is_one_line():
    from thinwire import OuterLoop
    from thinwire.errors import ConfigError

    model = example("example_data").make_model()
    for kwargs, msg in [({"sync": "ddp"}, "sync=ddp: averages gradients every step"),
                        ({"sync": "local", "local_steps": 0}, "sync.local_steps=0: must be >= 1"),
                        ({"sync": "local", "period": 3}, "sync=local: unknown option 'period'"),
                        ({"sync": "local", "comm": {"name": "topk", "ratio": 2.0}}, "ratio")]:
        with pytest.raises((ConfigError, ValueError)) as e:
            OuterLoop(model, **kwargs)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- MeZO / ZODist as torch optimizers ------------------------------------------------------------
class WithLoss(torch.nn.Sequential):
    """The example model with the trainer's contract ``loss = model(x=..., y=...)``."""

    def forward(self, x, y):
        return F.cross_entropy(super().forward(x), y)


class ExampleData:
    def train_batch(self, step):
        x, y = example("example_data").batch(step)
        return {"x": x, "y": y}


def zo_ranks(rank, world_size):
    from omegaconf import OmegaConf

    from thinwire.config.groups import groups
    from thinwire.optim import MeZO, ZODist
    from thinwire.optim.plugins import OPTIMIZERS

    out = {}
    model, losses, out["counts"] = example("mezo").train(6)
    out["example"] = params(model)
    for name, extra in (("mezo", {}), ("zo_dist", {"zo_mode": "per_rank"})):
        cfg = OmegaConf.merge(OmegaConf.structured(groups()["optim"].schema(name)),
                              {"name": name, "lr": 1e-3, "schedule": "constant", "weight_decay": 0.0,
                               "zo_samples": 2, **extra})
        ex = example("example_data")
        plugin_model = WithLoss(*ex.make_model())
        plugin = OPTIMIZERS.get(name, "optim")(cfg, plugin_model, max_steps=6, world=None)
        opt_model = ex.make_model().eval()
        opt = (MeZO(opt_model.parameters(), lr=1e-3, samples=2) if name == "mezo"
               else ZODist(opt_model.parameters(), lr=1e-3, samples=2, mode="per_rank"))
        for step in range(6):
            b = ExampleData().train_batch(step)
            plugin.compute(plugin_model, b)
            assert plugin.local_finite()
            plugin.apply(step)
            opt.step(lambda: F.cross_entropy(opt_model(b["x"]), b["y"]))
        out[name] = (params(plugin_model), params(opt_model))
    return out


def test_zeroth_order_optimizers_match_the_plugins_bitwise_on_two_ranks(tmp_path):
    r0, r1 = run_ranks(zo_ranks, 2, tmp_path)
    for r in (r0, r1):
        for name in ("mezo", "zo_dist"):
            plugin, opt = r[name]
            assert same(plugin, opt), name
        # shared seeds: 4 bytes of projected gradient + 2 of loss per step, 2 (p-1)/p of that
        assert r["counts"].data == 6 * 6
    assert same(r0["example"], r1["example"]) and same(r0["mezo"][1], r1["mezo"][1])
    assert not same(r0["example"], params(example("example_data").make_model()))  # it moved


def test_mezo_state_dict_resumes_and_closure_is_required():
    from thinwire.errors import ConfigError
    from thinwire.optim import MeZO

    ex = example("example_data")

    def run(model, opt, steps):
        g = torch.Generator().manual_seed(0)
        for step in steps:
            x = torch.randn(8, 32, generator=g)
            opt.step(lambda: F.cross_entropy(model(x), x[:, :4].argmax(1)))

    a = ex.make_model()
    opt_a = MeZO(a.parameters(), lr=1e-2, weight_decay=0.1)
    run(a, opt_a, range(4))
    b = ex.make_model()
    opt_b = MeZO(b.parameters(), lr=1e-2, weight_decay=0.1)
    run(b, opt_b, range(2))
    c = ex.make_model()
    c.load_state_dict(b.state_dict())
    opt_c = MeZO(c.parameters(), lr=1e-2, weight_decay=0.1)
    opt_c.load_state_dict(opt_b.state_dict())
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 32, generator=g) for _ in range(4)]
    for model, opt in ((c, opt_c),):
        for x in xs[2:]:
            opt.step(lambda: F.cross_entropy(model(x), x[:, :4].argmax(1)))
    a2 = ex.make_model()
    opt_a2 = MeZO(a2.parameters(), lr=1e-2, weight_decay=0.1)
    for x in xs:
        opt_a2.step(lambda: F.cross_entropy(a2(x), x[:, :4].argmax(1)))
    assert same(params(c), params(a2)) and opt_c.t == 4
    with pytest.raises(ConfigError, match="closure"):
        opt_a.step()


# -- LoRA-GA on a PEFT model ---------------------------------------------------------------------
def lora_ranks(rank, world_size):
    from omegaconf import OmegaConf

    from thinwire.comm.accounting import WireMeter
    from thinwire.config.groups import groups
    from thinwire.optim.peft import apply_peft

    model, counts = example("lora_ga").build()
    ex = example("example_data")
    cfg = OmegaConf.merge(OmegaConf.structured(groups()["peft"].schema("lora_ga")),
                          {"name": "lora_ga", "r": 2, "alpha": 4.0, "target_modules": ["0", "2"], "ga_batches": 4})
    trainer_model = apply_peft(cfg, WithLoss(*ex.make_model()), data=ExampleData(),
                               world=SimpleNamespace(rank=rank, world_size=world_size), meter=WireMeter())
    x, _ = ex.batch(99)
    return {"library": {k.removeprefix("base_model.model."): v.clone() for k, v in model.state_dict().items()},
            "trainer": params(trainer_model), "counts": counts,
            "out": model(x).detach(), "base_out": ex.make_model()(x).detach()}


def test_lora_ga_init_on_a_peft_model_equals_the_trainers_init(tmp_path):
    r0, r1 = run_ranks(lora_ranks, 2, tmp_path)
    for r in (r0, r1):
        assert same(r["library"], r["trainer"])
        assert any("lora_B" in k and r["library"][k].abs().sum() > 0 for k in r["library"])  # B != 0
        torch.testing.assert_close(r["out"], r["base_out"], rtol=0, atol=1e-5)  # output unchanged
        assert r["counts"].setup > 0 and r["counts"].wire == 0
    assert same(r0["library"], r1["library"])  # one averaged estimate: the same init everywhere


def test_outer_loop_presets_of_the_doc_table_run():
    """The trainer presets of docs/library.md's table, as OuterLoop arguments (one process)."""
    from thinwire import OuterLoop

    sgd = {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True}
    sparseloco = {"name": "chunk_topk", "feedback": "ef", "ef_decay": 0.95, "min_numel": 4096}
    for sync, options, rounds in (("local", {"local_steps": 4}, 4), ("local", {"outer_optim": sgd}, 4),
                                  ("co2", {"local_steps": 4}, 4),
                                  ("local", {"local_steps": 15, "clip": float("inf"), "comm": sparseloco}, 1)):
        with OuterLoop(example("example_data").make_model(), sync, **options) as outer:
            for _ in range(16):
                outer.step()
            assert outer.strategy.round == rounds and outer.steps == 16


# -- FSDP2 + OuterLoop: DiLoCo across islands on local shards -------------------------------------
def example_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """example_data.batch of ``rank``, in one process (its seed rule: 1000 * step + rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, x[:, :4].argmax(1)


def unsharded_islands_reference(steps: int, replicas: int, shards: int, local_steps: int) -> dict:
    """``replicas`` unsharded copies of the model, one process: each step replica i's gradient
    is the mean of its island's ranks' gradients (FSDP2's reduce-scatter: g_a / S + g_b / S),
    then its own AdamW; every ``local_steps`` the pseudo-gradients a - w_i are averaged across
    the replicas and the anchor takes one Nesterov SGD step; every replica restarts from it."""
    ex = example("fsdp2_outer_loop")
    models = [ex.make_residual_mlp() for _ in range(replicas)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    outer = torch.optim.SGD(anchor, lr=0.7, momentum=0.9, nesterov=True)
    for step in range(steps):
        for i, (m, opt) in enumerate(zip(models, opts)):
            grads = []
            for r in range(i * shards, (i + 1) * shards):
                m.zero_grad()
                x, y = example_batch(step, r)
                F.cross_entropy(m(x), y).backward()
                grads.append([p.grad.clone() for p in m.parameters()])
            for p, *g in zip(m.parameters(), *grads):
                p.grad = sum(x / shards for x in g) if shards > 1 else g[0]
            opt.step()
        if (step + 1) % local_steps == 0:
            with torch.no_grad():
                for j, a in enumerate(anchor):
                    deltas = [a - list(m.parameters())[j] for m in models]
                    a.grad = sum(deltas) / replicas
                outer.step()
                for m in models:
                    for p, a in zip(m.parameters(), anchor):
                        p.copy_(a)
    return [params(m) for m in models]


def fsdp2_ranks(rank, world_size, layouts, steps, local_steps, comm="none"):
    out = {}
    for replicas, shards in layouts:
        model, val, counts = example("fsdp2_outer_loop").train(steps, replicas, shards, comm=comm,
                                                               local_steps=local_steps, clip=float("inf"))
        whole = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        local = sum(p.to_local().numel() for p in model.parameters())
        out[replicas, shards] = {"params": whole, "val": val, "counts": counts, "local": local}
    from torch.distributed.device_mesh import init_device_mesh

    from thinwire import OuterLoop
    from thinwire.errors import ConfigError

    try:  # a mesh without the replicate dimension: one line naming the mesh
        OuterLoop(example("example_data").make_model(), "local",
                  mesh=init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",)))
        out["bad_mesh"] = None
    except ConfigError as e:
        out["bad_mesh"] = str(e)
    return out


def check_fsdp2_layouts(results, layouts, steps, local_steps):
    for replicas, shards in layouts:
        ref = unsharded_islands_reference(steps, replicas, shards, local_steps)
        for rank, r in enumerate(results):
            got = r[replicas, shards]
            assert same(got["params"], ref[rank // shards]), (replicas, shards, rank)  # bitwise
            numel = sum(v.numel() for v in ref[0].values())
            assert got["local"] * shards >= numel and got["local"] < numel or shards == 1
            # comm=none: one fp32 all-reduce of this rank's local shard per round, across the replicas
            assert got["counts"].data == (steps // local_steps) * allreduce_bytes(got["local"], replicas)
            assert math.isfinite(got["val"])
    for r in results:
        assert r["bad_mesh"].startswith("mesh=('shard',): OuterLoop takes a 2-D DeviceMesh"), r["bad_mesh"]
        assert "\n" not in r["bad_mesh"]


def test_fsdp2_outer_loop_equals_unsharded_islands(tmp_path):
    """docs/examples/library/fsdp2_outer_loop.py on 2 ranks, as one island of 2 (FSDP2 shards,
    the outer step on local shards) and as 2 islands of 1 (the outer average across them):
    every rank's whole parameters bitwise those of unsharded replicas whose gradient is the
    island's mean (5 steps, H = 2: ends mid-round)."""
    layouts, steps, h = ((1, 2), (2, 1)), 5, 2
    check_fsdp2_layouts(run_ranks(fsdp2_ranks, 2, tmp_path, layouts, steps, h), layouts, steps, h)


@pytest.mark.extended
def test_fsdp2_outer_loop_on_two_islands_of_two(tmp_path):
    """The same on 4 ranks, 2 islands of 2 (the HSDP layout): sharded and averaged at once. With
    an int8 outer average (two-phase: a second group per replicate group, made from the mesh on
    every rank) the islands' ranks hold the same whole parameters, close to the exact run's."""
    layouts, steps, h = ((2, 2),), 5, 2
    check_fsdp2_layouts(run_ranks(fsdp2_ranks, 4, tmp_path, layouts, steps, h), layouts, steps, h)
    steps = 6  # ends a round: every rank holds the consensus
    int8 = {"name": "int8", "collective": "two_phase", "feedback": "none", "min_numel": 64}
    q = [r[2, 2] for r in run_ranks(fsdp2_ranks, 4, tmp_path, layouts, steps, h, int8)]
    exact = unsharded_islands_reference(steps, 2, 2, h)[0]
    for r in q:
        assert same(r["params"], q[0]["params"])  # every rank: the same consensus after the last round
        assert not same(r["params"], exact)
        for k, v in exact.items():
            torch.testing.assert_close(r["params"][k], v, rtol=0, atol=0.05)
        assert 0 < r["counts"].data < (steps // h) * allreduce_bytes(r["local"], 2)  # ~1 byte per value

