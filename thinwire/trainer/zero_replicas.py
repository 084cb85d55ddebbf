"""ZeRO inside replica groups, local updates / CO2 across them (``engine=deepspeed`` with
``sync=local|co2``).

ZeRO-1/2 shard the optimizer state (and gradients) over their data-parallel group, so the
ranks of that group must step together: they cannot take independent local steps. The
world is therefore split into replica groups of ``engine.zero_group_size`` consecutive
ranks (by default the ranks of one node: ZeRO's per-step traffic stays on the fast
intra-node link). Each group is one DeepSpeed data-parallel group and one *replica* of
the model; the outer loop of ``sync=local|co2`` averages pseudo-gradients across the
replicas over the slow link, once per round::

    world 4, zero_group_size 2:   ZeRO groups  {0,1} {2,3}     (DeepSpeed's data-parallel group)
                                  cross groups {0,2} {1,3}     (the outer average)

All ranks of a group hold the same parameters after every ZeRO step, so rank j of every
group averages with rank j of the others and all cross groups compute the same mean.

The outer step reads and writes the fp32 master weights (the ZeRO shards of
``single_partition_of_fp32_groups``), not the module's parameters, which with bf16 are
only a rounded copy: reading gathers the shards of the group (one intra-group fp32
all-gather per round, counted), writing updates the module parameters and this rank's
shard of the master weights from the new full values every rank of the group holds.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..comm import accounting


def group_size(cfg_size, world_size: int) -> int:
    """``engine.zero_group_size``, or the ranks of one node when it is null."""
    if cfg_size:
        return int(cfg_size)
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


class ReplicaGroups:
    """The process groups of the layout (module doc), and DeepSpeed's ``mpu`` interface:
    data parallel = this rank's ZeRO group, model parallel = this rank alone. Every rank
    creates every group in the same order, as ``torch.distributed.new_group`` requires."""

    def __init__(self, world, size: int, meter, two_phase: bool):
        p = world.world_size
        self.meter, self.optimizer = meter, None  # DeepSpeed's ZeRO optimizer, once built
        self.size, self.replicas = size, p // size
        self.replica, self.index = divmod(world.rank, size)
        zero = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(self.replicas)]
        cross = [dist.new_group(list(range(j, p, size))) for j in range(size)]
        cross2 = [dist.new_group(list(range(j, p, size))) for j in range(size)] if two_phase else [None] * size
        alone = [dist.new_group([r]) for r in range(p)]
        self.zero_group, self.cross_group = zero[self.replica], cross[self.index]
        self.cross_group2, self.alone = cross2[self.index], alone[world.rank]
        self.zero_ranks = list(range(self.replica * size, (self.replica + 1) * size))

    def params_io(self, params: list[torch.nn.Parameter]) -> "ZeroMasterParams":
        """The outer loop's read/write view of ``params`` (fp32 master weights)."""
        return ZeroMasterParams(params, self.optimizer, self, self.meter)

    # DeepSpeed's mpu (Megatron's interface), as deepspeed.utils.groups queries it
    def get_data_parallel_group(self):
        return self.zero_group

    def get_data_parallel_world_size(self) -> int:
        return self.size

    def get_data_parallel_rank(self) -> int:
        return self.index

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.zero_ranks

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


class ZeroMasterParams:
    """The outer loop's view of the parameters (``read_flat``/``write_flat`` over the
    trainable parameters in ``named_parameters`` order, fp32) backed by ZeRO's fp32 master
    weights; same interface as ``thinwire.comm.outer.ModuleParams``."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer, groups: ReplicaGroups, meter):
        self.params, self.opt, self.groups, self.meter = params, optimizer, groups, meter
        self.where: list[tuple[int, int]] = []  # (ZeRO param group, offset in its flat buffer)
        for p in params:
            for i, flat in enumerate(optimizer.bit16_groups_flat):
                if any(q is p for q in optimizer.bit16_groups[i]):
                    self.where.append((i, (p.data_ptr() - flat.data_ptr()) // p.element_size()))
                    break
            else:
                raise RuntimeError("a trainable parameter is not in DeepSpeed's ZeRO param groups")
        for i, flat in enumerate(optimizer.bit16_groups_flat):
            shard = optimizer.single_partition_of_fp32_groups[i]
            if flat.numel() != shard.numel() * groups.size:
                raise RuntimeError(f"ZeRO group {i}: {flat.numel()} elements in {groups.size} shards of "
                                   f"{shard.numel()}: unequal shards are not supported")

    def _gather(self, kind: str) -> list[torch.Tensor]:
        """The full fp32 master flat of every ZeRO param group (intra-group all-gather)."""
        fulls = []
        for shard in self.opt.single_partition_of_fp32_groups:
            full = torch.empty(shard.numel() * self.groups.size, dtype=torch.float32, device=shard.device)
            accounting.all_gather_into(self.meter, full, shard.detach().float(), group=self.groups.zero_group,
                                       kind=kind)
            fulls.append(full)
        return fulls

    def read_flat(self, kind: str = "data") -> torch.Tensor:
        fulls = self._gather(kind)
        return torch.cat([fulls[i][o:o + p.numel()] for p, (i, o) in zip(self.params, self.where)])

    @torch.no_grad()
    def write_flat(self, flat: torch.Tensor) -> None:
        fulls = [torch.zeros(s.numel() * self.groups.size, dtype=torch.float32, device=s.device)
                 for s in self.opt.single_partition_of_fp32_groups]
        for p, (i, o), x in zip(self.params, self.where, flat.split([p.numel() for p in self.params])):
            fulls[i][o:o + p.numel()].copy_(x)
            p.copy_(x.view_as(p))
        for shard, full in zip(self.opt.single_partition_of_fp32_groups, fulls):
            shard.copy_(full.chunk(self.groups.size)[self.groups.index])
