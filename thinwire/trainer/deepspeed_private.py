"""Every access thinwire makes to DeepSpeed's private attributes, in one place (written
against DeepSpeed 0.19.8, ``deepspeed/runtime/zero/stage_1_and_2.py`` and
``deepspeed/ops/__init__.py``; tests/test_deepspeed.py exercises each of them).

The rest of thinwire uses DeepSpeed's public API only: ``deepspeed.initialize`` and the
engine's ``backward``, ``step``, ``optimizer.param_groups``, ``get_global_grad_norm``,
``save_checkpoint`` and ``load_checkpoint``. What needs more:

- the CPU backend's op probing (:func:`skip_op_builds`);
- this rank's overflow flag, without the group all-reduce that ``step`` does
  (:func:`shard_has_overflow`);
- a step that drops the reduced gradients the way DeepSpeed drops an fp16 overflow step
  (:func:`skip_step`);
- the ZeRO-1/2 partition layout, for the outer loop across replica groups
  (:func:`fp32_shards`, :func:`bit16_flat_groups`, :func:`bit16_param_groups`).
"""
from __future__ import annotations

import types

import torch


def skip_op_builds() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (inference only) when
    its op table says the op is buildable; an empty table skips that compile and the
    compiler probing: every collective goes through torch.distributed (gloo / NCCL)."""
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})


def shard_has_overflow(zero_optimizer) -> bool:
    """Whether this rank's reduced gradient shard holds a NaN or an infinity (ZeRO's own
    test, before its all-reduce over the data-parallel group)."""
    opt = zero_optimizer
    if opt.cpu_offload:
        return bool(opt.local_overflow)
    return bool(opt.has_overflow_partitioned_grads_serial())


def _overflowed(opt, partition_gradients: bool = True) -> None:
    opt.overflow = True


def skip_step(ds_engine) -> None:
    """``ds_engine.step()`` down DeepSpeed's overflow path: the reduced gradients are
    dropped, nothing is stepped, the engine counts a skipped step, as after an fp16
    overflow. Every rank of the data-parallel group calls it together (the ranks agreed
    to skip). For this one call the optimizer checks for overflow whatever its dtype and
    its overflow check reports one: an instance attribute shadows ``check_overflow``, and
    both are restored before returning."""
    opt = ds_engine.optimizer
    check_grad_overflow = opt.check_grad_overflow
    opt.check_grad_overflow = True
    opt.check_overflow = types.MethodType(_overflowed, opt)
    try:
        ds_engine.step()
    finally:
        del opt.check_overflow
        opt.check_grad_overflow = check_grad_overflow


def fp32_shards(zero_optimizer) -> list[torch.Tensor]:
    """This rank's partition of the fp32 master weights, one flat tensor per ZeRO param group."""
    return zero_optimizer.single_partition_of_fp32_groups


def bit16_flat_groups(zero_optimizer) -> list[torch.Tensor]:
    """The module's parameters of each ZeRO param group as one flat buffer (all partitions)."""
    return zero_optimizer.bit16_groups_flat


def bit16_param_groups(zero_optimizer) -> list[list[torch.nn.Parameter]]:
    """The module's parameters of each ZeRO param group, views into ``bit16_flat_groups``."""
    return zero_optimizer.bit16_groups
