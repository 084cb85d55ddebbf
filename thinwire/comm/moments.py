"""Inner-optimizer state across syncs: averaging AdamW's moments over the ranks (DES-LOC,
Iacob et al. 2025, arXiv 2505.22549, Algorithm 1: every rank averages its first moment every
K_u inner steps and its second every K_v, the parameters every K_x; here K_u, K_v count
rounds of H inner steps, so the moments are averaged at a round's end, after the outer step).

Why: between syncs each rank's first moment forgets the shared direction (0.9^H of it is left
after H steps) and is rebuilt from its own batches; averaging puts the shared part back.
How it combines with the outer optimizer: it does not touch the anchor or the outer
optimizer's state; the outer step moves the parameters, this moves the inner optimizer's
state, and the next round's inner steps start from both. How the strategy reaches the inner
optimizer's state: the trainer hands its optimizer plugin to ``SyncStrategy.bind_optimizer``;
the averaged buffers are the torch optimizer's per-parameter state (``exp_avg`` /
``exp_avg_sq`` for AdamW, ``momentum_buffer`` as the first moment for SGD), averaged in place
with one exact fp32 all-reduce per moment (charged to the meter as data bytes: 4 B per
parameter per moment, twice the ring factor). MT-DAO (arXiv 2510.05361) is this averaging with
``optim=mtdao`` (``thinwire.optim.mtdao``), whose ``exp_avg`` is a slow momentum.

Departure from DES-LOC: its moments are averaged on their own clocks between parameter
syncs; here only at round ends (the moments travel next to the pseudo-gradient's average).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import accounting

FIRST, SECOND = ("exp_avg", "momentum_buffer"), ("exp_avg_sq",)


class MomentAverager:
    def __init__(self, every_first: int, every_second: int, meter, group=None):
        self.every = {FIRST: every_first, SECOND: every_second}
        self.meter, self.group = meter, group
        self.optimizer = None

    @property
    def active(self) -> bool:
        return any(self.every.values())

    def bind(self, optimizer) -> None:
        if self.active and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"sync.moment1_every/moment2_every: optim has no torch optimizer state to average "
                              f"({type(optimizer).__name__}); use optim=adamw|sgd")
        self.optimizer = optimizer

    def buffers(self, keys: tuple[str, ...]) -> list[torch.Tensor]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                buf = next((st[k] for k in keys if k in st and torch.is_tensor(st[k])), None)
                if buf is not None:
                    out.append(buf)
        return out

    @torch.no_grad()
    def after_round(self, rnd: int) -> None:
        """Average the moments due at the end of round ``rnd`` (1-based) on every rank."""
        if self.optimizer is None:
            return
        for keys, every in self.every.items():
            if not every or rnd % every:
                continue
            bufs = self.buffers(keys)
            if not bufs:
                continue
            flat = torch.cat([b.reshape(-1).float() for b in bufs])
            accounting.all_reduce(self.meter, flat, group=self.group)
            flat.div_(accounting.group_size(self.group))
            for b, x in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(x.view_as(b))
