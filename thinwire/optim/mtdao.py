"""``optim=mtdao``: a slow first moment that outlives the rounds of local updates (MT-DAO,
Iacob et al. 2025, "MT-DAO: Multi-Timescale Distributed Adaptive Optimizers with Local
Updates", arXiv 2510.05361, its quasi-hyperbolic Adam form; the single-process update is
QHAdam, Ma & Yarats 2019, arXiv 1810.06801, Algorithm "QHAdam", with nu_2 = 1).

Why: under ``sync=local`` every rank's AdamW first moment (beta1 0.9, a half-life of 6.6
steps) keeps only 0.9^H of the shared direction after H local steps and is rebuilt from the
rank's own batches. MT-DAO gives the first moment a slow time scale (beta_slow ~ 0.99-0.999)
and mixes the raw gradient back in for responsiveness (weight ``1 - omega``), so the
direction the ranks agreed on at the last sync survives the round. Per parameter, with g
this rank's gradient and t the step count::

    u <- beta_slow u + (1 - beta_slow) g                     the slow momentum (state ``exp_avg``)
    v <- beta2 v + (1 - beta2) g^2                           (state ``exp_avg_sq``)
    p <- p (1 - lr wd)                                       decoupled decay (thinwire: matrices only)
    p <- p - lr (omega u / (1 - beta_slow^t) + (1 - omega) g) / (sqrt(v / (1 - beta2^t)) + eps)

``omega = 1`` with ``beta_slow = beta1`` is torch's AdamW step for step
(``tests/test_mtdao.py``). The distributed part is the sync strategy's: MT-DAO averages the
parameters every K_x steps, the slow momentum every K_u and the second moment every K_v
(the paper's Algorithm 1); here K_x is ``sync.local_steps`` and K_u, K_v are
``sync.moment1_every`` / ``sync.moment2_every`` in rounds (``thinwire.comm.moments``: the
strategy reaches this optimizer's ``exp_avg`` / ``exp_avg_sq`` through
``SyncStrategy.bind_optimizer``, one exact fp32 all-reduce per moment, counted). With
``sync=ddp`` every rank sees the mean gradient and the moments stay equal without any
exchange: it is QHAdam. How it combines with the outer optimizer: the outer step moves the
parameters (anchor), the averaging moves the inner optimizer's state; neither touches the
other.

beta2 must remember at least as long as the slow momentum: with AdamW's 0.95 (a 14-step
half-life) the denominator follows the shrinking gradients while the numerator still carries
the larger ones of 100-700 steps before, and the step grows; measured on the quality harness
(4 ranks, 1200 steps, H=8): beta_slow 0.995 and 0.999 diverged with beta2 0.95 (val loss 5.3
and 34 against local's 1.91) and trained normally with 0.999 (1.99 at 0.995). Default 0.999,
QHAdam's recommendation; omega 0.7 likewise (QHAdam's nu_1).

Choosing beta_slow for the run's length (the issue's advice and the paper's half-life rule):
its half-life ln 0.5 / ln beta_slow is 69 steps at 0.99, 138 at 0.995 and 693 at 0.999; it
should span several rounds (>= 4 H) but stay well under the run's length, or the momentum
still carries the first steps' direction at the end. Bias correction: QHAdam's (the slow
moment starts at 0; without it the first ~1/(1-beta_slow) steps would be damped).

Departures from the paper: its MT-DAO-Adam also allows several slow momenta (N > 1); here
N = 1, the form the paper calls the simplest (no memory beyond AdamW's, one hyperparameter
more). The paper has no grad clipping; ``optim.grad_clip`` applies to this rank's gradient
as for every backprop plugin.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import need, positive
from .plugins import OPTIMIZERS, BackpropOptions, BackpropPlugin


class QHAdamW(torch.optim.Optimizer):
    """QHAdam with decoupled weight decay: ``omega`` weighs the bias-corrected slow momentum
    against the raw gradient in the numerator (QHAdam's nu_1; its nu_2 is 1 here). State
    keys follow torch's AdamW (``step``, ``exp_avg``, ``exp_avg_sq``) so that moment averaging
    (``thinwire.comm.moments``) and checkpoints treat both alike."""

    def __init__(self, params, lr: float = 1e-3, beta_slow: float = 0.99, beta2: float = 0.999,
                 omega: float = 0.7, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta_slow=beta_slow, beta2=beta2, omega=omega, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, b1, b2, w = group["lr"], group["beta_slow"], group["beta2"], group["omega"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                u, v = st["exp_avg"], st["exp_avg_sq"]
                u.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                num = u.mul(w / (1 - b1 ** t))
                if w < 1:
                    num.add_(g, alpha=1 - w)
                p.addcdiv_(num, denom, value=-lr)
        return loss


@dataclass
class MTDAOOptions(BackpropOptions):
    beta_slow: float = 0.99          # the slow momentum's decay; half-life ln 0.5 / ln beta_slow steps
    beta2: float = 0.999             # longer than the slow momentum's memory (see the module's docstring)
    omega: float = 0.7               # weight of the slow momentum vs the raw gradient (QHAdam's nu_1)
    eps: float = 1e-8

    def check(self) -> None:
        super().check()
        need(0 <= self.beta_slow < 1, "beta_slow", self.beta_slow, "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        need(0 <= self.omega <= 1, "omega", self.omega, "must be in [0, 1] (1 = Adam's numerator)")
        positive(self, "eps")


@OPTIMIZERS.register("mtdao")
class MTDAOPlugin(BackpropPlugin):
    Config = MTDAOOptions

    def make_optimizer(self, groups):
        c = self.cfg
        return QHAdamW(groups, lr=c.lr, beta_slow=c.beta_slow, beta2=c.beta2, omega=c.omega, eps=c.eps)
