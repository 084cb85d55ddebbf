"""The compressed DDP comm hook: per bucket, error feedback -> compress each parameter ->
one collective -> decompress -> what the optimizer sees, written back into the bucket.

- The first ``warmup_steps`` accepted steps are plain fp32 all-reduces (DDP rebuilds its
  buckets after the first iteration; EF21 / EControl initialise their buffers from these
  dense rounds, at least one of them).
- Parameters with fewer than ``min_numel`` elements (biases, norms) travel uncompressed.
- The hook only launches work and chains ``Future.then``; nothing waits inside a callback.
- The error-feedback residual is kept in gradient units and rescaled by lr_{t-1} / lr_t
  when the trainer reports a new learning rate (``set_lr``), see feedback.py.
"""
# no "from __future__ import annotations": DDP checks the hook's return annotation at runtime
from typing import Callable, Optional

import torch

from .aggregator import CompressedAggregator
from .hooks import HookState, state_kwargs


class CompressedState(HookState):
    def __init__(self, name: str, fields: dict, **state_cfg):
        super().__init__(**state_cfg)
        self.aggregator = CompressedAggregator(name, fields, self.meter, self.process_group,
                                               self.second_group)
        if self.aggregator.feedback.dense_init:
            self.warmup_steps = max(self.warmup_steps, 1)
        self.lr_prev: Optional[float] = None
        self.lr_now: Optional[float] = None

    def set_lr(self, lr: float) -> None:
        """The learning rate of the step about to run (for the EF residual's rescaling)."""
        self.lr_now = lr

    @property
    def lr_ratio(self) -> float:
        if self.lr_prev is None or not self.lr_now:
            return 1.0
        return self.lr_prev / self.lr_now

    def commit(self) -> None:
        self.aggregator.commit()
        if self.lr_now is not None:
            self.lr_prev = self.lr_now
        super().commit()

    def discard(self) -> None:
        self.aggregator.discard()
        super().discard()

    def take_stats(self) -> dict:
        return self.aggregator.take_stats()

    def state_dict(self) -> dict:
        base = super().state_dict()  # flushes a pending auto-commit first
        return {**base, "lr_prev": self.lr_prev, "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lr_prev = state["lr_prev"]
        self.aggregator.load_state_dict(state["aggregator"])


def compressed_hook(state: CompressedState, bucket) -> torch.futures.Future[torch.Tensor]:
    state.begin_bucket(bucket)
    buf = bucket.buffer()
    names = state.bucket_names(bucket)
    sizes = [p.numel() for p in bucket.parameters()]
    views = list(buf.split(sizes))
    if state.in_warmup():
        fut = state.aggregator.launch_dense(names, views)
    else:
        fut = state.aggregator.launch(names, views, state.iteration, state.lr_ratio)

    def write_back(f: torch.futures.Future) -> torch.Tensor:
        for view, out in zip(views, f.value()):
            view.copy_(out)
        return buf

    return fut.then(write_back)


def compressed_factory(name: str) -> Callable:
    def factory(**cfg):
        return CompressedState(name, cfg, **state_kwargs(cfg)), compressed_hook
    return factory
