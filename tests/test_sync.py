"""Local updates and CO2 against independent references: plain DDP (local, H=1), a
single-process simulation of p workers (co2, one round stale), bitwise resume, real
overlap of the outer all-reduce, and convergence on the tiny char-GPT."""
import json
import threading
import time

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from thinwire.comm.accounting import WireMeter
from thinwire.data.base import DataInfo
from thinwire.models.gpt import build_gpt

from conftest import run_ranks

VOCAB, BLOCK, B = 20, 8, 4


def make_model():
    torch.manual_seed(0)
    return build_gpt(info=DataInfo("tokens", 0, vocab_size=VOCAB), n_layer=2, n_head=2, n_embd=16, block_size=BLOCK)


def batch(step: int, rank: int, world_size: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, VOCAB, (B * world_size, BLOCK), generator=g)[rank * B:(rank + 1) * B]
    return {"x": x, "y": torch.roll(x, -1, dims=1)}


def sgd_cfg(lr, momentum=0.0):
    return OmegaConf.create({"lr": lr, "momentum": momentum, "nesterov": False, "weight_decay": 0.0,
                             "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0, "decay_start": None, "grad_clip": 0.0})


def sync_cfg(name, outer_lr=1.0, outer_momentum=0.0, nesterov=False, **kw):
    """A sync config; the outer SGD's lr / momentum / nesterov given as in the paper's notation."""
    base = {"name": name, "local_steps": 1, "staleness_penalty": 0.0, "clip": 1e6, "clip_mode": "norm",
            "outer_optim": {"_target_": "torch.optim.SGD", "lr": outer_lr, "momentum": outer_momentum,
                            "nesterov": nesterov}}
    return OmegaConf.create({**base, **kw})


def world_of(rank, world_size):
    from thinwire.trainer.world import World

    return World(rank, world_size, 0, torch.device("cpu"), "gloo", dist.new_group())


def run_strategy(rank, world_size, sync, steps, lr, momentum, comm=None, delay_s=0.0, compute_s=0.0):
    """The trainer's calls, by hand: compute, apply, (engine commit), sync.after_step."""
    from thinwire.comm.sync import build_sync
    from thinwire.optim.plugins import SGDPlugin
    from thinwire.trainer.engine import DDPEngine

    world = world_of(rank, world_size)
    model, meter = make_model(), WireMeter()
    engine_cfg = OmegaConf.create({"bucket_cap_mb": 25, "gradient_as_bucket_view": True,
                                   "find_unused_parameters": False})
    grad_sync = sync.name == "ddp"
    engine = DDPEngine(engine_cfg, model, world, meter, OmegaConf.create({"name": "none"}), grad_sync=grad_sync)
    plugin = SGDPlugin(sgd_cfg(lr, momentum), model, max_steps=steps)
    strategy = build_sync(sync, world, meter, model, OmegaConf.create(comm or {"name": "none"}))
    strategy.bind_optimizer(plugin)
    if delay_s:  # a slow link: the outer average completes delay_s after launch
        real = strategy.averager.average_async

        def slow(*args):
            fut, inner = torch.futures.Future(), real(*args)
            threading.Timer(delay_s, lambda: fut.set_result(inner.wait())).start()
            return fut
        strategy.averager.average_async = slow
    waits, metrics = [], []
    for step in range(steps):
        plugin.compute(engine.forward_model, batch(step, rank, world_size))
        time.sleep(compute_s)
        plugin.apply(step)
        engine.commit()
        m = strategy.after_step(step)
        waits.append(m.get("comm_wait_s", 0.0))
        metrics.append(m)
    with strategy.eval_model() as m:
        mean = {k: v.detach().clone() for k, v in m.state_dict().items()}
    strategy.close()
    momentum = [plugin.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()] if momentum else []
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "mean": mean,
            "waits": waits, "metrics": metrics, "clipped": getattr(getattr(strategy, "outer", None), "clipped", 0),
            "momentum": momentum, "bytes": meter.totals["data"]}


def test_local_h1_outer_lr1_equals_ddp_sgd(tmp_path):
    steps = 6
    ddp = run_ranks(run_strategy, 2, tmp_path, sync_cfg("ddp"), steps, 0.3, 0.0)
    local = run_ranks(run_strategy, 2, tmp_path, sync_cfg("local"), steps, 0.3, 0.0)
    for r in range(2):
        for k, v in ddp[0]["params"].items():
            torch.testing.assert_close(local[r]["params"][k], v, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(local[0]["params"][k], local[1]["params"][k]) for k in local[0]["params"])


# -- co2 against a single-process simulation of p workers ------------------------------
def co2_reference(p, steps, H, lr, momentum, outer_lr, beta, penalty, clip, stale=True, batch_of=None):
    """p workers with their own SGD; the outer average of round t is applied at the end of
    round t+1 (Nesterov outer SGD, layer-wise gap penalty, global-norm clip), written out
    from CO2's algorithm (Sun et al. 2024, ICLR) with plain tensors. ``stale=False``: sync=local, the average of a
    round is applied at its own end. ``batch_of(step, i)``: worker i's batch."""
    batch_of = batch_of or (lambda step, i: batch(step, i, p))
    workers = [make_model() for _ in range(p)]
    opts = [torch.optim.SGD(w.parameters(), lr=lr, momentum=momentum) for w in workers]
    params = [list(w.parameters()) for w in workers]
    anchor = [x.detach().clone() for x in params[0]]
    mom = [torch.zeros_like(a) for a in anchor]
    in_flight, snaps, last = None, None, None

    def snapshot():
        s = [[a - w for a, w in zip(anchor, params[i])] for i in range(p)]
        return s, [sum(x[j] for x in s) / p for j in range(len(anchor))]

    for step in range(steps):
        for i in range(p):
            opts[i].zero_grad()
            workers[i](**batch_of(step, i)).backward()
            opts[i].step()
        if (step + 1) % H:
            continue
        with torch.no_grad():
            if not stale:
                snaps, in_flight = snapshot()
            if in_flight is not None:
                d = [x.clone() for x in in_flight]
                if last is not None and penalty > 0:
                    d = [x / (1 + penalty * s.norm() / x.norm()) for x, s in zip(d, last)]
                norm = torch.sqrt(sum((x.double() ** 2).sum() for x in d))
                if norm > clip:
                    d = [x * (clip / (float(norm) + 1e-12)) for x in d]
                for m, x in zip(mom, d):
                    m.mul_(beta).add_(x)
                last = [-outer_lr * (x + beta * m) for x, m in zip(d, mom)]
                for a, s in zip(anchor, last):
                    a.add_(s)
                for i in range(p):
                    for w, s, y in zip(params[i], last, snaps[i]):
                        w.add_(s).add_(y)
            if stale:
                snaps, in_flight = snapshot()
    return [{k: v.detach() for k, v in w.state_dict().items()} for w in workers]


@pytest.mark.parametrize("p", [2, 3])
def test_co2_equals_single_process_one_round_stale_reference(tmp_path, p):
    steps, H, lr, mom, outer_lr, beta, penalty, clip = 14, 3, 0.2, 0.5, 0.8, 0.6, 1.0, 0.05
    cfg = sync_cfg("co2", local_steps=H, outer_lr=outer_lr, outer_momentum=beta, nesterov=True,
                   staleness_penalty=penalty, clip=clip)
    results = run_ranks(run_strategy, p, tmp_path, cfg, steps, lr, mom)
    ref = co2_reference(p, steps, H, lr, mom, outer_lr, beta, penalty, clip)
    for r in range(p):
        for k, v in ref[r].items():
            torch.testing.assert_close(results[r]["params"][k], v, rtol=1e-4, atol=1e-5)
    assert results[0]["clipped"] > 0  # the clip was exercised
    # the evaluated model is the mean of the ranks' live parameters, the same on every rank
    for k, v in results[0]["mean"].items():
        torch.testing.assert_close(v, sum(ref[r][k] for r in range(p)) / p, rtol=1e-4, atol=1e-5)
        assert torch.equal(v, results[-1]["mean"][k])
    rounds = [m for m in results[0]["metrics"] if "outer_round" in m]
    assert len(rounds) == steps // H and "staleness_gap_norm" not in rounds[0]
    assert all(m["staleness_penalty_mean"] > 1.0 for m in rounds[2:])  # the penalty acts


def test_co2_hides_a_slow_outer_all_reduce_that_local_waits_for(tmp_path):
    """Outer average delayed 0.4 s (a slow link); a round computes 4 x 0.15 s. local
    blocks for the whole delay every round; co2 consumes it a round later, already done."""
    delay = 0.4
    args = (12, 0.1, 0.0, None, delay, 0.15)
    local = run_ranks(run_strategy, 2, tmp_path, sync_cfg("local", local_steps=4), *args)
    co2 = run_ranks(run_strategy, 2, tmp_path, sync_cfg("co2", local_steps=4), *args)
    for r in range(2):
        local_wait, co2_wait = sum(local[r]["waits"]), sum(co2[r]["waits"])
        assert local_wait > 3 * delay * 0.9, local_wait
        assert co2_wait < 0.2 * local_wait, (co2_wait, local_wait)
        consumed = [m for m in co2[r]["metrics"] if "overlap_fraction" in m]
        assert consumed and min(m["overlap_fraction"] for m in consumed) > 0.9


# -- through the CLI: resume and convergence --------------------------------------------
TINY = ["experiment=tiny", "trainer.max_steps=16", "trainer.checkpoint_every=8", "trainer.eval_every=8",
        "model.dropout=0.1", "sync.local_steps=4"]
RESUME_CASES = {
    "local": ["sync=local"],
    "local-topk-ef": ["sync=local", "comm=topk", "comm.ratio=0.05", "comm.feedback=ef", "comm.min_numel=256"],
    "co2": ["sync=co2", "sync.outer_optim.momentum=0.5", "sync.outer_optim.nesterov=true"],
    "co2-int8-two-phase": ["sync=co2", "comm=int8", "comm.collective=two_phase", "comm.min_numel=256"],
    # stopped at step 6: eager with round 1's mean in flight; streaming (H=8, F=2, tau=3) with
    # fragment 1's mean in flight (launched at step 5, merged at 8); moments averaged each round
    "co2-eager": ["sync=co2", "sync.overlap=eager"],
    "stream": ["sync=local", "sync.local_steps=8", "sync.fragments=2", "sync.fragment_delay=3",
               "sync.fragment_alpha=0.5"],
    "stream-topk-ef": ["sync=local", "sync.local_steps=8", "sync.fragments=2", "sync.fragment_delay=3",
                       "comm=topk", "comm.ratio=0.05", "comm.feedback=ef", "comm.min_numel=256"],
    # MT-DAO: the slow momentum (exp_avg) averaged every round, the second moment every 2
    "local-mtdao-moments": ["sync=local", "optim=mtdao", "sync.moment1_every=1", "sync.moment2_every=2"],
}


def rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def rank_params(run_dir, step, rank):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / f"rank{rank:05d}.pt", weights_only=False)["model"]


@pytest.mark.parametrize("case", list(RESUME_CASES), ids=list(RESUME_CASES))
def test_stop_mid_round_and_resume_equals_uninterrupted_bitwise(pools, tmp_path, case):
    """Stopped at step 6: mid-round, and for co2 with round 1's average in flight."""
    args = [*TINY, *RESUME_CASES[case]]
    full, split = tmp_path / "full", tmp_path / "split"
    p = pools.train(*args, f"hydra.run.dir={full}")
    p = pools.train(*args, "trainer.stop_after=6", f"hydra.run.dir={split}")
    p = pools.train(*args, "trainer.resume=auto", f"hydra.run.dir={split}")
    assert "at step 6" in p.stdout
    key = ("step", "loss", "val_loss")
    assert [[r.get(k) for k in key] for r in rows(full)] == [[r.get(k) for k in key] for r in rows(split)]
    for rank in (0, 1):
        a, b = rank_params(full, 16, rank), rank_params(split, 16, rank)
        assert all(torch.equal(a[k], b[k]) for k in a), (case, rank)


@pytest.mark.extended  # two runs of 500 steps
def test_co2_converges_within_15_percent_of_local(pools, tmp_path):
    """2 ranks, tiny char-GPT, 500 steps, AdamW 3e-3, H=4 (docs/sync.md's table: 1000 steps).
    Measured over trainer.seed=0-4 (the same two runs per seed, on the pooled ranks): co2 vs
    local at 500 steps +0.5%, +8.9%, +10.8%, +9.0%, +10.4% (val loss 2.363 / 2.352,
    2.521 / 2.315, 2.578 / 2.326, 2.563 / 2.352, 2.619 / 2.372): seed 0 is the exception. The
    bound, 15%, is the largest (+10.8%) plus about 4 points; it catches a co2 that stops
    learning or diverges (an outer step not applied, stale by more than one round), not the
    staleness penalty's few percent (seed 0 without it, sync.staleness_penalty=0: +7.6%);
    the update itself is checked against test_co2_equals_single_process_one_round_stale_reference."""
    common = ["experiment=tiny", "trainer.max_steps=500", "trainer.eval_every=500",
              "trainer.checkpoint_every=500", "optim.lr=3e-3", "sync.local_steps=4"]
    final = {}
    for name in ("local", "co2"):
        p = pools.train(*common, f"sync={name}", f"hydra.run.dir={tmp_path / name}", timeout=400)
        final[name] = rows(tmp_path / name)[-1]["val_loss"]
    assert final["co2"] <= 1.15 * final["local"], final


def test_nonfinite_step_on_one_rank_is_skipped_locally_under_co2(pools, tmp_path):
    """Ranks step independently within a round: no per-step collective; rank 0 skips its
    poisoned step, counts it, and the outer rounds go on with finite parameters."""
    p = pools.train(*TINY, "sync=co2", "trainer.faults.nan_at=6", "trainer.faults.rank=0",
                    f"hydra.run.dir={tmp_path}")
    r = rows(tmp_path)
    assert [x["skipped_steps"] for x in r] == [0] * 5 + [1] * 11
    # nothing agreed per step; a round end agrees one finiteness flag (4 bytes, then 1 rank's
    # share) and the replica-drift guard all-gathers a hash and a skip count (16 bytes)
    assert all(x["control_bytes"] == 0 for x in r if "val_loss" not in x and x["step"] % 4)
    assert all(0 < x["control_bytes"] <= 4 + 16 for x in r if "val_loss" not in x and x["step"] % 4 == 0)
    for rank in (0, 1):
        assert all(torch.isfinite(v).all() for v in rank_params(tmp_path, 16, rank).values())


@pytest.mark.parametrize("name", ["local", "co2"])
def test_nonfinite_step_at_any_round_position_neither_hangs_nor_spreads(pools, tmp_path, name):
    """Rank 0's step is poisoned at the first step, at a round's last step (where the outer
    collective runs) and at the run's last step: the poisoned rank skips it on its own and
    still joins the round's collective (a rank that skipped the boundary step used to wait
    out dist.timeout_s alone), the skip is counted, and nothing non-finite reaches any
    rank; under local updates the ranks hold the same parameters after the last round."""
    for nan_at in (1, 8, 16):
        run = tmp_path / f"nan{nan_at}"
        out = pools.train_all(*TINY, f"sync={name}", f"trainer.faults.nan_at={nan_at}", "trainer.faults.rank=0",
                              "trainer.checkpoint_every=16", f"hydra.run.dir={run}", timeout=90)
        # the skip is said by the rank that made it, and only by it
        assert f"rank 0: step {nan_at} skipped" in out[0].stdout and "skipped" not in out[1].stdout
        r = rows(run)
        assert [x["skipped_steps"] for x in r] == [0] * (nan_at - 1) + [1] * (17 - nan_at), (nan_at, r)
        params = [rank_params(run, 16, rank) for rank in (0, 1)]
        assert all(torch.isfinite(v).all() for p in params for v in p.values()), nan_at
        if name == "local":
            assert all(torch.equal(params[0][k], params[1][k]) for k in params[0]), nan_at
    # a skip on another rank than 0 is said by that rank, and reaches rank 0's metrics with the
    # replica-drift guard's all-gather at the next round boundary (skipped_steps/rank<R>)
    out = pools.train_all(*TINY, f"sync={name}", "trainer.faults.nan_at=6", "trainer.faults.rank=1",
                          "trainer.checkpoint_every=16", f"hydra.run.dir={tmp_path / 'rank1'}", timeout=90)
    assert "rank 1: step 6 skipped" in out[1].stdout and "skipped" not in out[0].stdout
    per_rank = [(x["step"], x["skipped_steps/rank0"], x["skipped_steps/rank1"]) for x in rows(tmp_path / "rank1")
                if "skipped_steps/rank1" in x]
    assert per_rank == [(s, 0, int(s >= 6)) for s in range(4, 17, 4)], per_rank


@pytest.mark.parametrize("case", ["co2", "co2-int8-two-phase"])
def test_co2_wire_bytes_are_the_same_run_to_run(pools, tmp_path, case):
    """The outer all-reduce runs in the background across steps; its bytes are charged to a
    fixed step (its launch), not to whichever step its callback happened to finish in."""
    args = [*TINY, *RESUME_CASES[case], "trainer.checkpoint_every=16"]
    for name in ("a", "b"):
        pools.train(*args, f"hydra.run.dir={tmp_path / name}")
    key = ("step", "wire_bytes", "control_bytes")
    a, b = ([[r.get(k) for k in key] for r in rows(tmp_path / n)] for n in ("a", "b"))
    assert a == b


def test_comm_warmup_and_dense_init_apply_to_outer_rounds(pools, tmp_path):
    """Under local updates ``comm.warmup_steps`` counts outer rounds and ``comm.init=dense``
    starts EF21 from the first round's own pseudo-gradient: that round is an exact fp32
    all-reduce (the bytes of one), the next ones compressed; before, both did nothing here."""
    base = ["experiment=tiny", "trainer.max_steps=8", "trainer.eval_every=8", "trainer.checkpoint_every=8",
            "sync=local", "sync.local_steps=2", "comm=topk", "comm.ratio=0.05", "comm.min_numel=0"]
    cases = ((["comm.warmup_steps=0", "comm.feedback=ef"], 0),
             (["comm.warmup_steps=2", "comm.feedback=ef"], 2),
             (["comm.warmup_steps=0", "comm.feedback=ef21", "comm.init=dense"], 1))
    for i, (extra, dense_rounds) in enumerate(cases):
        run = tmp_path / f"case{i}"
        pools.train(*base, *extra, f"hydra.run.dir={run}")
        ends = [x for x in rows(run) if x["step"] % 2 == 0]
        data = [x["wire_bytes"] - x["control_bytes"] for x in ends]
        dense = ends[0]["dense_bytes"]  # an fp32 ring all-reduce of every parameter
        assert data[:dense_rounds] == [dense] * dense_rounds, (extra, data)
        assert all(0 < d < dense / 4 for d in data[dense_rounds:]), (extra, data)
