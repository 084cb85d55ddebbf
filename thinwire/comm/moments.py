"""Inner-optimizer state across syncs: averaging AdamW's moments over the ranks (DES-LOC,
Iacob et al. 2025, arXiv 2505.22549, Alg. 1: the first moment every K_u inner steps, the second
every K_v; here K_u, K_v count rounds, so moments are averaged at a round's end, after the outer
step). Why: after H steps a rank's first moment keeps 0.9^H of the shared direction; averaging
puts it back. It moves only the inner optimizer's state (reached through ``bind``: the torch
optimizer's ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer`` as the first moment), never
the anchor; one exact fp32 all-reduce per moment over the group given (4 B per parameter, data
bytes). Sharded moments (FSDP2's DTensors) are averaged as this rank's local shards, over a
group of the ranks that hold the same shard (``engine=fsdp2``: the replicate group).
MT-DAO (arXiv 2510.05361) is this with ``optim=mtdao`` (``thinwire.optim.mtdao``).
Departure from DES-LOC: moments are averaged only at round ends, not on their own clocks.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..tensors import local_shard
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
                if buf is not None:  # a DTensor: this rank's local shard, written in place
                    out.append(local_shard(buf))
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
