# thinwire_examples/lion.py
"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2;
public code: github.com/google/automl/tree/master/lion) as an optimizer plugin::

    c = beta1 m + (1 - beta1) g
    theta <- theta - lr (sign(c) + weight_decay theta)
    m <- beta2 m + (1 - beta2) g
"""
from dataclasses import dataclass, field

import torch

from thinwire.errors import need
from thinwire.optim.plugins import BackpropOptions, BackpropPlugin


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


@dataclass
class LionOptions(BackpropOptions):  # grad_clip, and Lion's own betas
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])

    def check(self):
        super().check()
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
             "must be two numbers in [0, 1)")


class LionPlugin(BackpropPlugin):
    Config = LionOptions

    def make_optimizer(self, groups):  # groups: >= 2-D tensors with weight decay, the rest without
        return Lion(groups, lr=self.cfg.lr, betas=self.cfg.betas)
