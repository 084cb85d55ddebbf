"""Recipes for training frameworks, on 2 freshly spawned gloo ranks (Lightning and
Accelerate keep process-wide state, so they never run on the pooled ranks): the Lightning
callback registers thinwire's hook on CPU, where ``DDPStrategy(ddp_comm_hook=...)`` silently
does not, and the compressed run sends far fewer bytes than the uncompressed one; the
Accelerate recipe equals a plain DDP loop with the same hook; the torchtitan-style script runs
on the pooled ranks. Skipped without ``lightning`` (in the ``test`` extra)."""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import run_fresh_ranks, run_ranks
from test_library import example, params, same

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None


def framework_ranks(rank, world_size, with_lightning, tmp):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), GROUP_RANK="0",
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                      OMP_NUM_THREADS="1", TORCHELASTIC_RUN_ID="thinwire-test")
    import time

    t0 = time.perf_counter()
    out = {}
    model, out["acc_counts"] = example("accelerate_loop").train(6, "topk", ratio=0.05, feedback="ef", min_numel=1024)
    out["acc"] = params(model)
    out["acc_ref"] = plain_ddp(6)
    out["acc_s"] = time.perf_counter() - t0
    if not with_lightning:
        return out
    from lightning.pytorch.strategies import DDPStrategy

    from thinwire.comm import comm_hook
    from thinwire.integrations.lightning import ThinwireCommHook

    import time

    fit = example("lightning_fit").fit
    t0 = time.perf_counter()
    dense, topk = ThinwireCommHook("none"), ThinwireCommHook("topk", ratio=0.05, feedback="ef", min_numel=1024)
    fit(dense)
    out["topk_params"] = params(fit(topk))
    out["dense"], out["topk"] = dense.meter.total(), topk.meter.total()
    out["fit_s"] = (time.perf_counter() - t0) / 2
    # state_dir: per-rank files written at a Lightning save, read back at the next fit's start
    state_dir = os.path.join(tmp, "comm-state")
    saver = ThinwireCommHook("topk", ratio=0.05, feedback="ef", min_numel=1024, state_dir=state_dir)
    saver.state = topk.state
    saver.on_save_checkpoint(SimpleNamespace(global_rank=rank), None, {})
    model = example("example_data").make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    fake = SimpleNamespace(strategy=SimpleNamespace(model=ddp, _ddp_comm_hook=None), global_rank=rank,
                           optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])
    loader = ThinwireCommHook("topk", ratio=0.05, feedback="ef", min_numel=1024, state_dir=state_dir)
    loader.on_fit_start(fake, model)
    out["saved_state"], out["loaded_state"] = topk.state.state_dict(), loader.state.state_dict()
    # Lightning's own route: the strategy takes the hook but registers it only on CUDA
    state, hook = comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024)
    fit(None, strategy=DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook))
    out["strategy_route_iterations"] = state.iteration + int(state._iteration_done)
    errors = []
    cb = ThinwireCommHook("none")
    for call in (lambda: cb.on_fit_start(SimpleNamespace(strategy=SimpleNamespace(model=torch.nn.Linear(1, 1))), None),
                 lambda: (setattr(cb, "state", SimpleNamespace(last_launch_s=0.0)),
                          cb.on_before_optimizer_step(None, None, None))):
        try:
            call()
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def plain_ddp(steps):
    """The Accelerate example's loop without Accelerate."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from thinwire.comm import comm_hook

    data = example("example_data")
    model = data.make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    state, hook = comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024, model=model, optimizer=opt)
    ddp.register_comm_hook(state, hook)
    for step in range(steps):
        x, y = data.batch(step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        sched.step()
    return params(model)


@pytest.fixture(scope="module")
def frameworks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frameworks")
    return run_fresh_ranks(framework_ranks, 2, tmp, HAS_LIGHTNING, str(tmp))


@pytest.mark.extended  # fresh ranks importing Accelerate and Lightning: ~15 s; the torchtitan-style loop stays
def test_accelerate_recipe_equals_a_plain_ddp_loop_with_the_hook(frameworks):
    for r in frameworks:
        assert same(r["acc"], r["acc_ref"])
        assert r["acc_counts"].data > 0
    assert same(frameworks[0]["acc"], frameworks[1]["acc"])


@pytest.mark.extended  # shares the fresh ranks of the Accelerate test
@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed (pip install thinwire[test])")
def test_lightning_callback_runs_the_hook_on_cpu_and_bytes_go_down(frameworks):
    from thinwire.meter import allreduce_bytes

    numel = sum(p.numel() for p in example("example_data").make_model().parameters())
    for r in frameworks:
        assert r["dense"].data == 8 * allreduce_bytes(numel, 2)  # every step through the hook, fp32
        assert 0 < r["topk"].data < 0.3 * r["dense"].data
        assert r["strategy_route_iterations"] == 0  # DDPStrategy(ddp_comm_hook=) never ran it on CPU
        not_ddp, did_not_run = r["errors"]
        assert "needs strategy='ddp'" in not_ddp and "did not run" in did_not_run
    assert same(frameworks[0]["topk_params"], frameworks[1]["topk_params"])
    for r in frameworks:
        saved, loaded = r["saved_state"], r["loaded_state"]
        assert loaded["iteration"] == saved["iteration"] == 8 and loaded["lr_prev"] == saved["lr_prev"]
        for name, bufs in saved["aggregator"]["feedback"].items():
            assert same(bufs, loaded["aggregator"]["feedback"][name])


def test_torchtitan_style_script_logs_typed_bytes(tmp_path):
    for log in run_ranks(plain_loop_ranks, 2, tmp_path, 30):
        assert len(log) == 30 and all(row["comm/data_bytes"] > 0 for row in log)
        # int8 values (+ fp32 scales) gathered: about half of a bf16 all-reduce at 2 ranks
        assert all(0.4 < row["comm/ratio_to_bf16"] < 0.6 for row in log[1:]), log
        # it trains: every step's batch is new, so the loss is averaged over 10 steps; the
        # last 10 against the first 10 (measured: 0.85x; a run that does not learn stays
        # near 1x, within the batches' noise of a few %)
        first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (log[:10], log[-10:]))
        assert last < 0.92 * first, [round(r["loss"], 3) for r in log]


def plain_loop_ranks(rank, world_size, steps):
    return example("plain_loop").main(steps)
