"""``sync.outer_optim``: any torch optimizer on the anchor, with clipping as a pre-step;
the shipped default reproduces the earlier hand-written outer SGD bit for bit."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from thinwire.comm.outer import CO2Config, LocalConfig, OuterOptimizer
from thinwire.config import ConfigError, compose


def reference_outer_sgd(anchor, momentum, d, lr, beta, nesterov, clip):
    """The outer SGD of thinwire <= 0.3 (CO2 paper Eq. 3), written out: norm clip,
    m = beta m + u, a -= lr (u + beta m) (Nesterov) or lr m."""
    norm = sum(float(x.double().pow(2).sum()) for x in d) ** 0.5
    if norm > clip:
        d = [x * (clip / (norm + 1e-12)) for x in d]
    steps = []
    for a, m, g in zip(anchor, momentum, d):
        m.mul_(beta).add_(g)
        upd = g.add(m, alpha=beta) if nesterov else m.clone()
        upd.mul_(-lr)
        a.add_(upd)
        steps.append(upd)
    return steps


def _pieces(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g) * scale, torch.randn(11, generator=g) * scale]


@pytest.mark.parametrize("cfg_cls", [LocalConfig, CO2Config])
def test_default_outer_step_is_bitwise_the_earlier_outer_sgd(cfg_cls):
    cfg = OmegaConf.structured(cfg_cls().resolved() if cfg_cls is CO2Config else cfg_cls)  # stale: CO2's recipe
    spec = cfg.outer_optim
    anchor, ref_anchor = _pieces(0), _pieces(0)
    ref_m = [torch.zeros_like(a) for a in ref_anchor]
    opt = OuterOptimizer(anchor, cfg)
    for t in range(5):
        d = _pieces(100 + t, scale=0.3 if t % 2 else 3.0)  # some rounds clipped, some not
        opt.step(anchor, [x.clone() for x in d])
        reference_outer_sgd(ref_anchor, ref_m, [x.clone() for x in d], spec.lr, spec.momentum,
                            spec.nesterov, cfg.clip)
        for a, r in zip(anchor, ref_anchor):
            assert torch.equal(a, r), t
    assert opt.clipped > 0
    for m, r in zip(opt.momentum(), ref_m):
        assert torch.equal(m, r) or spec.momentum == 0


def test_diloco_recipe_matches_the_equations():
    """sync=diloco: SGD, Nesterov 0.9, here with Douillard et al. 2023's lr 0.7 (Alg. 1 outer step)."""
    cfg = compose(["sync=diloco", "sync.clip=1e9", "sync.outer_optim.lr=0.7"]).sync
    anchor = _pieces(1)
    a0 = [a.clone() for a in anchor]
    opt = OuterOptimizer(anchor, cfg)
    d1, d2 = _pieces(2), _pieces(3)
    opt.step(anchor, [x.clone() for x in d1])
    opt.step(anchor, [x.clone() for x in d2])
    for a, x, g1, g2 in zip(anchor, a0, d1, d2):
        m1 = g1
        m2 = 0.9 * m1 + g2
        expect = x - 0.7 * (g1 + 0.9 * m1) - 0.7 * (g2 + 0.9 * m2)
        torch.testing.assert_close(a, expect, rtol=1e-6, atol=1e-6)


def test_any_torch_optimizer_and_its_state_round_trips():
    cfg = OmegaConf.create({"outer_optim": {"_target_": "torch.optim.Adam", "lr": 0.1, "betas": [0.5, 0.9]},
                            "clip": 1e9, "clip_mode": "norm"})
    anchor = _pieces(4)
    opt = OuterOptimizer(anchor, cfg)
    steps = opt.step(anchor, _pieces(5))
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint holds it (torch.save)
    # Adam's first step moves every element by lr (sign of the gradient), whatever its size
    for s, g in zip(steps, _pieces(5)):
        torch.testing.assert_close(s, -0.1 * torch.sign(g), rtol=1e-4, atol=1e-5)
    twin = OuterOptimizer(_pieces(4), cfg)
    twin_anchor = twin.params
    for a, b in zip(twin_anchor, anchor):
        a.copy_(b)
    twin.load_state_dict(saved)
    d = _pieces(6)
    opt.step(anchor, [x.clone() for x in d])
    twin.step(twin_anchor, [x.clone() for x in d])
    for a, b in zip(anchor, twin_anchor):
        assert torch.equal(a, b)


def test_bad_outer_optimizer_is_one_line():
    with pytest.raises(ConfigError, match=r"outer_optim=.*Invalid learning rate"):
        LocalConfig(outer_optim={"_target_": "torch.optim.SGD", "lr": -1.0}).check()
    with pytest.raises(ConfigError, match=r"outer_optim._target_=torch.optim.Nope: not an importable class"):
        LocalConfig(outer_optim={"_target_": "torch.optim.Nope"}).check()


def test_co2_defaults_follow_the_overlap_and_given_keys_update_its_recipe():
    """sync=co2 leaves penalty, clip and recipe to its overlap: stale = CO2's (penalty 0.5,
    clip 1, Nesterov 0.5 lr 1), eager = none, no clip, outer SGD lr 1 without momentum (the
    paper's update); keys given under sync.outer_optim update the overlap's recipe."""
    from thinwire.comm.outer import co2_options

    stale = co2_options(compose(["sync=co2"]).sync)
    assert (stale.staleness_penalty, stale.clip, dict(stale.outer_optim)) == (
        0.5, 1.0, {"_target_": "torch.optim.SGD", "lr": 1.0, "momentum": 0.5, "nesterov": True})
    eager = co2_options(compose(["sync=co2", "sync.overlap=eager", "sync.outer_optim.momentum=0.9"]).sync)
    assert (eager.staleness_penalty, eager.clip, dict(eager.outer_optim)) == (
        0.0, float("inf"), {"_target_": "torch.optim.SGD", "lr": 1.0, "momentum": 0.9, "nesterov": False})
