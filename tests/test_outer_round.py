"""Every configuration of the one outer-loop strategy (``thinwire.comm.local``) against a
single-process reference written out with plain tensors, over (a) a ``ParamSpace`` that holds a
strided half of every parameter (as a shard would) and (b) a subgroup of 2 of 4 ranks (as a
changing membership would): both are new implementations of ``ParamSpace`` / ``Replicas``
defined here, with no edit to the strategy. The new compositions (co2 with fragments, eager with
streaming) also resume bitwise from a checkpoint taken with averages in flight."""
import io

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from thinwire.comm.param_space import DataParallel, ParamSpace, global_norm

from conftest import run_ranks

OUTER = {"_target_": "torch.optim.SGD", "lr": 1.0, "momentum": 0.0, "nesterov": False}
NESTEROV = {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True}
CASES = {  # name -> the sync node (clip off, so the reference needs none)
    "local": {"name": "local", "local_steps": 2, "outer_optim": OUTER},
    "diloco": {"name": "local", "local_steps": 2, "outer_optim": NESTEROV},
    "co2": {"name": "co2", "local_steps": 2, "staleness_penalty": 0.5,
            "outer_optim": {**NESTEROV, "lr": 1.0, "momentum": 0.5}},
    "eager": {"name": "co2", "local_steps": 2, "overlap": "eager"},
    "streaming": {"name": "local", "local_steps": 4, "fragments": 2, "fragment_delay": 1, "fragment_alpha": 0.5,
                  "outer_optim": NESTEROV},
    "co2+fragments": {"name": "co2", "local_steps": 4, "fragments": 2, "staleness_penalty": 0.5},
    "eager+streaming": {"name": "co2", "local_steps": 4, "fragments": 2, "overlap": "eager"},
}
CASES = {k: {"clip": 1e6, "clip_mode": "norm", **v} for k, v in CASES.items()}
STEPS, LR = 12, 0.1
NONE = {"name": "none"}
# experiment=sparseloco at this scale: local, no clip, chunked top-k with decayed error feedback
SPARSELOCO = ({"name": "local", "local_steps": 3, "clip": float("inf"), "clip_mode": "norm", "outer_optim": OUTER},
              {"name": "chunk_topk", "feedback": "ef", "ef_decay": 0.95, "warmup_steps": 0, "min_numel": 0,
               "collective": "auto", "seed": 0, "eta": 0.1, "init": "dense", "chunk": 16, "k": 4, "bits": 2,
               "mean": "contributors"})


def make_model():
    torch.manual_seed(0)  # blocks 0, 2, 4: strided fragments {0, 4} and {2}
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))


def inner_step(model, opt, step, member):
    g = torch.Generator().manual_seed(1000 * step + member)
    x = torch.randn(8, 4, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
    opt.step()


def whole(p):
    return p.detach().view(-1)


def half(p):
    return p.detach().view(-1)[::2]


class StridedHalf(ParamSpace):
    """Every other element of every parameter: a shard-like space (pieces are parts of layers)."""

    def __init__(self, model_params):
        self.names, self.params = model_params.names, model_params.params
        self.sizes = [half(p).numel() for p in self.params]

    def split(self, flat):
        return list(flat.split(self.sizes))

    def read_flat(self):
        return torch.cat([half(p) for p in self.params]).float()

    def write_flat(self, flat):
        for p, x in zip(self.params, self.split(flat)):
            half(p).copy_(x)

    def layer_norms(self, pieces):
        return [float(t.norm()) for t in pieces]

    def global_norm(self, pieces):
        return global_norm(pieces)


class HalfReplicas(DataParallel):
    def shards(self, model_params):
        return StridedHalf(model_params)


# -- the reference: p workers in one process ---------------------------------------------------
def outer_sgd(spec, a, buf, d):
    """torch.optim.SGD's step on anchor pieces ``a`` with gradients ``d`` (buf: momentum, per piece)."""
    lr, mu, nesterov = spec["lr"], spec.get("momentum", 0.0), spec.get("nesterov", False)
    before = [x.clone() for x in a]
    for k, (x, g) in enumerate(zip(a, d)):
        if mu:
            buf[k] = g.clone() if buf[k] is None else buf[k].mul_(mu).add_(g)
            g = g.add(buf[k], alpha=mu) if nesterov else buf[k]
        x.add_(g, alpha=-lr)
    return [x - b for x, b in zip(a, before)]


def reference(case, p, view, member0=0):
    from thinwire.comm.rounds import co2_options

    cfg = OmegaConf.to_container(co2_options(case) if case["name"] == "co2" else OmegaConf.create(case))
    H, F = cfg["local_steps"], cfg.get("fragments", 1)
    merge = cfg.get("overlap", "sync")
    delay, alpha = (cfg.get("fragment_delay", 0), cfg.get("fragment_alpha", 0.0)) if merge == "sync" else (H, 0.0)
    spec, strength = cfg["outer_optim"], cfg.get("staleness_penalty") or 0.0
    workers = [make_model() for _ in range(p)]
    opts = [torch.optim.SGD(w.parameters(), lr=LR) for w in workers]
    xs = [[view(q) for q in w.parameters()] for w in workers]
    n = len(xs[0])
    frags = [[k for k in range(n) if (k // 2) % F == j] for j in range(F)]  # two pieces per block
    anchor, buf = [x.clone() for x in xs[0]], [None] * n
    start = [[x.clone() for x in xs[i]] for i in range(p)]
    flights, last = {}, {}
    offset = [((j + 1) * H // F) % H for j in range(F)]

    def do_merge(j):
        ks, (mean, snaps) = frags[j], flights.pop(j)
        a, b = [anchor[k] for k in ks], [buf[k] for k in ks]
        if merge == "eager":  # the consensus takes the mean
            outer_sgd(spec, a, b, mean)
        elif merge == "sync":
            outer_sgd(spec, a, b, mean)
            for i in range(p):
                for k in ks:
                    xs[i][k].copy_(alpha * xs[i][k] + (1 - alpha) * anchor[k])
        else:
            lam = [1.0 + strength * float(s.norm()) / float(d.norm()) if j in last and strength else 1.0
                   for d, s in zip(mean, last.get(j, mean))]
            last[j] = outer_sgd(spec, a, b, [d / m for d, m in zip(mean, lam)])
            for i in range(p):
                for k, s, y in zip(ks, last[j], snaps[i]):
                    xs[i][k].add_(s + y)
        for k, x, y in zip(ks, a, b):
            anchor[k], buf[k] = x, y

    def do_launch(j):
        ks = frags[j]
        own = [[start[i][k] for k in ks] if merge == "eager" else [anchor[k] for k in ks] for i in range(p)]
        snaps = [[o - xs[i][k] for o, k in zip(own[i], ks)] for i in range(p)]
        flights[j] = ([sum(s[m] for s in snaps) / p for m in range(len(ks))], snaps)
        if merge == "eager":  # each worker: its fresh share on a copy of the consensus
            for i in range(p):
                a = [anchor[k].clone() for k in ks]
                outer_sgd(spec, a, [None if buf[k] is None else buf[k].clone() for k in ks],
                          [s / p for s in snaps[i]])
                for k, x in zip(ks, a):
                    start[i][k], _ = x, xs[i][k].copy_(x)

    for step in range(STEPS):
        s = step + 1
        for i in range(p):
            inner_step(workers[i], opts[i], step, member0 + i)
        for j in range(F):
            if offset[j] == s % H and j in flights:
                do_merge(j)
        for j in range(F):
            if (offset[j] - delay) % H == s % H:
                do_launch(j)
                if delay == 0:
                    do_merge(j)
    return [{k: v.detach().clone() for k, v in w.state_dict().items()} for w in workers]


# -- the strategy on real ranks ----------------------------------------------------------------
def run_strategy(world, replicas, case, member, steps=STEPS, stop_at=None, comm=NONE):
    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.sync import build_sync

    model, meter = make_model(), WireMeter()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    strategy = build_sync(OmegaConf.create(case), world, meter, model, OmegaConf.create(comm), replicas)
    for step in range(steps):
        if step == stop_at:  # checkpoint, then continue in a fresh process's objects
            saved = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sync": strategy.state_dict()}, saved)
            saved.seek(0)
            state = torch.load(saved, weights_only=True)
            model, meter = make_model(), WireMeter()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            strategy = build_sync(OmegaConf.create(case), world, meter, model, OmegaConf.create(comm), replicas)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            strategy.load_state_dict(state["sync"])
        inner_step(model, opt, step, member)
        strategy.global_step(step)
    strategy.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strided_half_rank(rank, world_size, cases, stop_at, comms=None):
    from thinwire.trainer.world import World

    world = World(rank, world_size, 0, torch.device("cpu"), "gloo", dist.new_group())
    return {name: run_strategy(world, HalfReplicas(world), case, rank, stop_at=stop_at.get(name),
                               comm=(comms or {}).get(name, NONE)) for name, case in cases.items()}


def subgroup_rank(rank, world_size, cases):
    from thinwire.trainer.world import World

    world = World(rank, world_size, 0, torch.device("cpu"), "gloo", dist.new_group())
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    asyncs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    g = rank // 2
    replicas = DataParallel(world, group=pairs[g], cross_group=asyncs[g])
    out = {name: run_strategy(world, replicas, case, 10 * g + rank % 2) for name, case in cases.items()}
    return {**out, "sparseloco": run_strategy(world, replicas, SPARSELOCO[0], 10 * g + rank % 2, comm=SPARSELOCO[1])}


def sparseloco_rank(rank, world_size, member0):
    from thinwire.trainer.world import World

    world = World(rank, world_size, 0, torch.device("cpu"), "gloo", dist.new_group())
    return run_strategy(world, DataParallel(world), SPARSELOCO[0], member0 + rank, comm=SPARSELOCO[1])


def assert_matches(got, want, what):
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {k}: {m}")


def test_every_configuration_over_a_strided_half_space_equals_the_reference(tmp_path):
    ranks = run_ranks(strided_half_rank, 2, tmp_path, CASES, {})
    for name, case in CASES.items():
        want = reference(case, 2, half)
        for r in range(2):
            assert_matches(ranks[r][name], want[r], f"{name}, rank {r}")


@pytest.mark.extended  # ~20 s: four ranks
def test_every_configuration_on_a_subgroup_of_2_of_4_ranks_equals_the_reference(tmp_path):
    ranks = run_ranks(subgroup_rank, 4, tmp_path, CASES)
    for name, case in CASES.items():
        for g in range(2):  # each pair trains on its own data and talks only to itself
            want = reference(case, 2, whole, member0=10 * g)
            for r in range(2):
                assert_matches(ranks[2 * g + r][name], want[r], f"{name}, group {g}, rank {2 * g + r}")
    # SparseLoCo (compressed, error feedback): each pair is bitwise the 2-rank world run on its data
    for g in range(2):
        world = run_ranks(sparseloco_rank, 2, tmp_path, 10 * g)
        for r in range(2):
            assert all(torch.equal(ranks[2 * g + r]["sparseloco"][k], v) for k, v in world[r].items()), (g, r)


def test_new_compositions_resume_bitwise_with_averages_in_flight(tmp_path):
    cases = {k: CASES[k] for k in ("co2+fragments", "eager+streaming")}
    cases["co2+fragments, top-k + EF"] = CASES["co2+fragments"]  # two fragments' feedback staged at once
    comms = {"co2+fragments, top-k + EF": SPARSELOCO[1]}
    straight = run_ranks(strided_half_rank, 2, tmp_path, cases, {}, comms)
    resumed = run_ranks(strided_half_rank, 2, tmp_path, cases, {k: 5 for k in cases}, comms)  # averages in flight
    for name in cases:
        for r in range(2):
            for k, v in straight[r][name].items():
                assert torch.equal(resumed[r][name][k], v), (name, r, k)


@pytest.mark.parametrize("overrides, line", [
    (["sync.fragment_delay=1"], "sync.fragment_delay=1: sync=co2 merges each fragment one whole round after its "
                                "launch; the delay tau is sync=local's"),
    (["sync.fragment_alpha=0.5"], "sync.fragment_alpha=0.5: sync=co2 keeps each rank's progress since the launch "
                                  "whole (w += a_{t+1} - y_t); the merge weight is sync=local's"),
])
def test_co2_with_what_cannot_compose_is_one_line_naming_key_and_value(overrides, line):
    from thinwire.config import compose, validate
    from thinwire.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(compose(["sync=co2", "sync.local_steps=4", "sync.fragments=2", *overrides]))
    assert str(e.value) == line
