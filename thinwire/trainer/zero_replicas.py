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

Rank j of every group holds the same ZeRO shard j of the fp32 master weights, so the
outer loop runs on shards: rank j averages its shard's pseudo-gradient with rank j of the
other groups, and anchor, outer momentum, CO2's snapshot and in-flight mean are 1/s of the
model per rank, sharded like ZeRO's own optimizer state (the memory-efficient outer state of
the CO2 reference, here falling out of ZeRO's layout). Per round and rank: the cross-group
average of n/s elements, then the all-gather of the updated module parameters inside the
group (as after every ZeRO step), plus two small norm all-reduces inside the group (clip and
staleness penalty need norms over whole layers). With bf16 the outer loop still works on the
fp32 masters, never on the rounded module copy.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from ..comm import accounting
from ..comm.groups import new_group
from ..comm.param_space import ModuleParams, ParamSpace, Replicas
from . import deepspeed_private


def group_size(cfg_size, world_size: int) -> int:
    """``engine.zero_group_size``, or the ranks of one node when it is null."""
    if cfg_size:
        return int(cfg_size)
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


class ReplicaGroups(Replicas):
    """The process groups of the layout (module doc): the outer loop's
    ``thinwire.comm.param_space.Replicas``, and DeepSpeed's ``mpu`` interface:
    data parallel = this rank's ZeRO group, model parallel = this rank alone. Every rank
    creates every group in the same order, as ``torch.distributed.new_group`` requires (all
    through ``thinwire.comm.groups.new_group`` with ``world.timeout_s``)."""

    def __init__(self, world, size: int, meter, two_phase: bool):
        p = world.world_size
        self.meter, self.optimizer = meter, None  # DeepSpeed's ZeRO optimizer, once built
        self.size, self.replicas = size, p // size
        self.replica, self.index = divmod(world.rank, size)
        group = functools.partial(new_group, timeout_s=world.timeout_s)
        zero = [group(list(range(g * size, (g + 1) * size))) for g in range(self.replicas)]
        cross = [group(list(range(j, p, size))) for j in range(size)]
        cross2 = [group(list(range(j, p, size))) for j in range(size)] if two_phase else [None] * size
        alone = [group([r]) for r in range(p)]
        self.zero_group, self.cross_group = zero[self.replica], cross[self.index]
        self.cross_group2, self.alone = cross2[self.index], alone[world.rank]
        # every rank skips and stops together; the ranks holding the same shard agree bitwise
        self.control_group, self.consensus_group = None, self.cross_group
        self.zero_ranks = list(range(self.replica * size, (self.replica + 1) * size))

    def shards(self, model_params: ModuleParams) -> "ZeroShards":
        """The outer loop's space: this rank's shard of the fp32 master weights."""
        return ZeroShards(model_params, self.optimizer, self, self.meter)

    def eval_space(self, model_params: ModuleParams, space: ParamSpace) -> tuple[ParamSpace, object]:
        """The module's (whole, gathered) parameters over the world: each replica counted as
        often as it has ranks, so the world's mean is the replicas' mean."""
        return model_params, self.control_group

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


class ZeroShards(ParamSpace):
    """The outer loop's space under ZeRO (a ``thinwire.comm.param_space.ParamSpace``, like ``ModuleParams``):
    this rank's shard of the fp32 master weights. Rank j of every replica group holds the same
    shard j, so averaging shards across the cross group is the replicas' mean, and anchor,
    outer momentum, snapshot and mean are 1/s of the model per rank, like ZeRO's own state.

    Pieces are the fragments of the trainable parameters that fall inside the shard (named by
    their parameter: compression stays layer-wise, error-feedback state keyed by name);
    ``layer_norms``/``global_norm`` add the squares of all shards of the group (one small
    all-reduce inside it). Reading is local; writing updates the shard, copies it into the
    module's (bit16) partition and all-gathers the partitions inside the group, as ZeRO does
    after its own step."""

    def __init__(self, model_params: ModuleParams, optimizer, groups: ReplicaGroups, meter):
        self.groups, self.meter = groups, meter
        self.shards = deepspeed_private.fp32_shards(optimizer)
        self.flat_groups = deepspeed_private.bit16_flat_groups(optimizer)
        self.param_groups = deepspeed_private.bit16_param_groups(optimizer)
        self.pieces: list[tuple[int, int, int]] = []  # (ZeRO param group, offset in shard, numel)
        self.layer_of: list[int] = []
        self.names: list[str] = []
        for layer, (name, p) in enumerate(zip(model_params.names, model_params.params)):
            i, offset = self._locate(p)
            size = self.shards[i].numel()
            lo, hi = max(offset, groups.index * size), min(offset + p.numel(), (groups.index + 1) * size)
            if hi > lo:
                self.pieces.append((i, lo - groups.index * size, hi - lo))
                self.layer_of.append(layer)
                self.names.append(name)
        self.sizes = [n for _, _, n in self.pieces]
        self.n_layers = len(model_params.params)
        if not self.pieces:
            raise RuntimeError(f"engine.zero_group_size={groups.size}: this rank's ZeRO shard holds no parameters")

    def _locate(self, p) -> tuple[int, int]:
        for i, flat in enumerate(self.flat_groups):
            if any(q is p for q in self.param_groups[i]):
                if flat.numel() != self.shards[i].numel() * self.groups.size:
                    raise RuntimeError(f"ZeRO group {i}: {flat.numel()} elements in {self.groups.size} shards of "
                                       f"{self.shards[i].numel()}: unequal shards are not supported")
                return i, (p.data_ptr() - flat.data_ptr()) // p.element_size()
        raise RuntimeError("a trainable parameter is not in DeepSpeed's ZeRO param groups")

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(self.sizes))

    def read_flat(self) -> torch.Tensor:
        return torch.cat([self.shards[i].detach()[o:o + n] for i, o, n in self.pieces]).float()

    @torch.no_grad()
    def write_flat(self, flat: torch.Tensor) -> None:
        for (i, o, n), x in zip(self.pieces, self.split(flat)):
            self.shards[i][o:o + n].copy_(x)
        for i, shard in enumerate(self.shards):  # the module's parameters: ZeRO's post-step all-gather
            flat_i = self.flat_groups[i]
            mine = flat_i.chunk(self.groups.size)[self.groups.index]
            mine.copy_(shard)
            accounting.all_gather_into(self.meter, flat_i, mine.clone(), group=self.groups.zero_group)

    def _layer_squares(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        # on the pieces' device: NCCL reduces CUDA tensors only (a CPU tensor fails there)
        sq = torch.zeros(self.n_layers, dtype=torch.float64, device=pieces[0].device if pieces else "cpu")
        for layer, t in zip(self.layer_of, pieces):
            sq[layer] += t.double().pow(2).sum()
        accounting.all_reduce(self.meter, sq, group=self.groups.zero_group, kind="control")
        return sq

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]:
        norms = self._layer_squares(pieces).sqrt()
        return [float(norms[layer]) for layer in self.layer_of]

    def global_norm(self, pieces: list[torch.Tensor]) -> float:
        return math.sqrt(float(self._layer_squares(pieces).sum()))
