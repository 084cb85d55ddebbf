"""The optimizer plugin as the loop sees it under ``engine=deepspeed``: :class:`ZeroStep`
routes forward, backward and step through the DeepSpeed engine, and charges ZeRO's traffic.

Wire bytes: DeepSpeed's collectives bypass thinwire's accounting wrappers, so the bytes
of each step are computed from what ZeRO-1/2 sends in DeepSpeed 0.19.8 (checked against
DeepSpeed's own comms logger in tests/test_deepspeed.py), with n = trainable elements,
p = world size (the ZeRO group's size under replica groups), b_grad =
``communication_data_type`` size (default: the parameter dtype's), b_param = 2 with bf16
else 4::

    gradients, in backward (default: use_multi_rank_bucket_allreduce: true,
      or reduce_scatter: false)      all-reduce of every bucket    2 (p-1)/p * n * b_grad
    gradients, reduce_scatter: true and use_multi_rank_bucket_allreduce: false
                                     reduce of each slice to its owner  (p-1)/p * n * b_grad
    parameters, after the step       all-gather of the updated shards   (p-1)/p * n * b_param

The scalar all-reduces of overflow flags and gradient norms (4-12 bytes) are left out.
"""
from __future__ import annotations

import torch

from ..comm import accounting
from ..optim.plugins import OptimizerPlugin
from . import deepspeed_private
from .deepspeed_config import DTYPE_BYTES


def wire_bytes_per_step(ds: dict, numel: int, world_size: int) -> tuple[int, int]:
    """ZeRO-1/2 traffic of one step per rank (module docstring): (gradient reduction in
    backward, all-gather of the updated parameters after the step)."""
    bf16 = ds.get("bf16", {}).get("enabled", False)
    b_param = 2 if bf16 else 4
    b_grad = DTYPE_BYTES[ds["communication_data_type"]] if ds.get("communication_data_type") else b_param
    zero = ds.get("zero_optimization", {})
    to_owners = zero.get("reduce_scatter", True) and not zero.get("use_multi_rank_bucket_allreduce", True)
    # a reduce of each 1/p slice to its owner sends what a reduce-scatter sends
    grads = "reduce_scatter" if to_owners else "all_reduce"
    return (accounting.collective_bytes(grads, numel, b_grad, world_size),
            accounting.collective_bytes("reduce_scatter", numel, b_param, world_size))  # = the all-gather


class ZeroStep(OptimizerPlugin):
    """The optimizer plugin as the loop sees it, with DeepSpeed doing backward and step.

    The plugin still defines the learning rate schedule and its optimizer (handed to
    DeepSpeed, which shards its state); DeepSpeed owns backward (gradient reduction into
    the shards), clipping, the step and the all-gather of the updated parameters.

    ``ds_engine``/``ds_config``: what ``deepspeed.initialize`` returned and was given;
    ``dp_size``: ranks of the ZeRO group; ``zero_group``: that group when the ranks of a
    replica group must agree on a skip among themselves (replica groups step independently;
    None: the loop agrees across all ranks)."""

    needs_backprop = True

    def __init__(self, plugin: OptimizerPlugin, ds_engine, ds_config: dict, meter, *, numel: int,
                 dp_size: int, zero_group=None, device: torch.device | None = None):
        super().__init__(plugin.cfg, plugin.model, max_steps=plugin.max_steps, world=plugin.world, meter=meter)
        self.plugin, self.ds, self.zero_group, self.device = plugin, ds_engine, zero_group, device
        self.clipping = ds_config["gradient_clipping"] > 0
        self.grad_bytes, self.param_bytes = wire_bytes_per_step(ds_config, numel, dp_size)

    def lr(self, step: int) -> float:
        return self.plugin.lr(step)

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        loss = self.ds(**batch)
        self.ds.backward(loss)  # reduces gradients into this rank's shard (ZeRO-2: bucket by bucket)
        self.meter.charge(self.grad_bytes)
        return loss.detach()

    def local_finite(self) -> bool:
        """Finite gradients in this rank's shard, agreed inside the ZeRO group when it is a
        replica group (see the class docstring)."""
        finite = not deepspeed_private.shard_has_overflow(self.ds.optimizer)
        if self.zero_group is None:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        accounting.all_reduce(self.meter, flag, op=torch.distributed.ReduceOp.MIN, group=self.zero_group,
                              kind="control")
        return bool(flag.item() == 1.0)

    def apply(self, step: int) -> dict[str, float]:
        lr = self.lr(step)
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr
        self.ds.step()
        self.meter.charge(self.param_bytes)
        out = {"lr": lr}
        if self.clipping:
            out["grad_norm"] = float(self.ds.get_global_grad_norm())
        return out

    def discard(self) -> None:
        """Drop this step's reduced gradients the way DeepSpeed drops an fp16 overflow step
        (every rank calls this together: the loop agreed to skip)."""
        deepspeed_private.skip_step(self.ds)

    def state_dict(self) -> dict:
        return {}  # the optimizer state is in DeepSpeed's sharded checkpoint files

    def load_state_dict(self, state: dict) -> None:
        pass
