"""Distributed: 2-rank DDP with thinwire's engine and comm hook equals a single-process
run on the concatenated batch (plain SGD), and the library hook works in a user's loop."""
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from thinwire.comm.accounting import WireMeter, collective_bytes
from thinwire.data.base import DataInfo
from thinwire.models.gpt import build_gpt

from conftest import run_ranks

VOCAB, BLOCK, B, STEPS, LR = 20, 8, 4, 5, 0.5


def make_model():
    torch.manual_seed(0)
    return build_gpt(info=DataInfo("tokens", 0, vocab_size=VOCAB), n_layer=2, n_head=2, n_embd=16, block_size=BLOCK)


def global_batch(step: int, world_size: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, VOCAB, (B * world_size, BLOCK), generator=g)
    return x, torch.roll(x, -1, dims=1)


def peer_fp16_factory(name, *, meter, **_):
    """A ``comm_hook`` factory that hands the engine torch's fp16 hook (what a benchmark
    plugs in to compare with a peer): a ``HookState`` whose hook charges 2 B per element."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from thinwire.comm.hooks import HookState

    state = HookState(meter=meter, auto_commit=False)
    state.calls = 0

    def hook(st, bucket):
        st.calls += 1
        st.meter.charge(collective_bytes("all_reduce", bucket.buffer().numel(), 2, dist.get_world_size()), "data")
        st.begin_bucket(bucket)
        return default_hooks.fp16_compress_hook(None, bucket)
    return state, hook


def thinwire_engine_run(rank, world_size, hook_factory=None):
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import DDPEngine
    from thinwire.trainer.world import World

    world = World(rank, world_size, 0, torch.device("cpu"), "gloo", None)
    model = make_model()
    meter = WireMeter()
    engine_cfg = OmegaConf.create({"bucket_cap_mb": 0.01, "gradient_as_bucket_view": True,
                                   "find_unused_parameters": False})
    kw = {"comm_hook": hook_factory} if hook_factory else {}
    engine = DDPEngine(engine_cfg, model, world, meter, OmegaConf.create({"name": "none"}), grad_sync=True, **kw)
    optim_cfg = OmegaConf.create({"lr": LR, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                                  "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0, "decay_start": None,
                                  "grad_clip": 0.0})
    plugin = SGDPlugin(optim_cfg, model, max_steps=STEPS)
    meter.take_step()
    per_step = []
    for step in range(STEPS):
        x, y = global_batch(step, world_size)
        plugin.compute(engine.forward_model, {"x": x[rank * B:(rank + 1) * B], "y": y[rank * B:(rank + 1) * B]})
        plugin.apply(step)
        engine.commit()
        per_step.append(meter.take_step().get("data", 0))
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "bytes": per_step, "numel": engine.numel, "iteration": engine.hook_state.iteration,
            "calls": getattr(engine.hook_state, "calls", None)}


def reference_run(world_size):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = global_batch(step, world_size)
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    return model.state_dict()


def test_two_rank_ddp_equals_single_process_on_concatenated_batch(tmp_path):
    results = run_ranks(thinwire_engine_run, 2, tmp_path)
    ref = reference_run(2)
    for r in results:
        for k, v in ref.items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-6)
        # every step: one fp32 ring all-reduce of all gradients, accounted exactly
        assert r["bytes"] == [collective_bytes("all_reduce", r["numel"], 4, 2)] * STEPS
        assert r["iteration"] == STEPS
    for k in ref:
        assert torch.equal(results[0]["params"][k], results[1]["params"][k])


def test_engine_takes_a_peer_hook_through_its_factory_argument(tmp_path):
    """``DDPEngine(comm_hook=...)``: torch's fp16 hook runs instead of thinwire's (no
    monkeypatching), its bytes are what the factory's state charges, and the result is the
    single-process reference up to fp16 rounding of the averaged gradients."""
    results = run_ranks(thinwire_engine_run, 2, tmp_path, peer_fp16_factory)
    ref = reference_run(2)
    for r in results:
        assert r["calls"] is not None and r["calls"] >= STEPS  # torch's hook ran, every step
        assert r["bytes"] == [collective_bytes("all_reduce", r["numel"], 2, 2)] * STEPS
        for k, v in ref.items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-2, atol=1e-3)
        assert any(not torch.equal(r["params"][k], v) for k, v in ref.items())  # fp16 did round
    for k in ref:
        assert torch.equal(results[0]["params"][k], results[1]["params"][k])


def user_loop(rank, world_size, use_hook):
    """What a user writes: plain DDP, optionally with thinwire's hook registered."""
    from thinwire.comm import comm_hook

    model = make_model()
    ddp = DDP(model)
    state = None
    if use_hook:
        state, hook = comm_hook("none", model=model)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = global_batch(step, world_size)
        opt.zero_grad()
        ddp(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]).backward()
        opt.step()
    dist.barrier()
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "state": state.state_dict() if state else None}


def test_library_hook_equals_plain_allreduce_in_user_loop(tmp_path):
    plain = run_ranks(user_loop, 2, tmp_path, False)
    hooked = run_ranks(user_loop, 2, tmp_path, True)
    for k, v in plain[0]["params"].items():
        torch.testing.assert_close(hooked[0]["params"][k], v, rtol=1e-5, atol=1e-6)
    state = hooked[0]["state"]
    assert state["iteration"] == STEPS  # auto-commit advanced once per step
    # per-rank state: the rank and the comm config's fingerprint, checked on load (docs/library.md)
    assert (state["rank"], state["world_size"]) == (0, 2) and state["config"]["name"] == "none"
