"""What the outer loop works on and with whom: the :class:`ParamSpace` protocol (named
pieces, read and written as one flat fp32 vector), :class:`ModuleParams` (a module's trainable
parameters), and the :class:`Replicas` protocol (the groups it talks over and the space of
this rank): :class:`DataParallel` (every rank one whole replica) or ZeRO replica groups, whose
space is this rank's shard (``thinwire.trainer.zero_replicas``). The outer loop
(``thinwire.comm.local``) reads, averages and writes parameters only through a space and
talks only over the replicas' groups, so the same code runs on DDP replicas, on ZeRO shards
and on a subgroup of the ranks.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` together, summed in fp64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


class ParamSpace(Protocol):
    """The parameters the outer loop reads, writes and averages, as named pieces.

    ``names[i]``/``sizes[i]``: piece i's name (layer-wise compression and error-feedback
    state are keyed by it) and element count; ``read_flat()`` a fresh fp32 vector of all
    pieces, ``write_flat(flat)`` its inverse; ``split(flat)`` views of the pieces,
    ``flat(pieces)`` a fresh fp32 concatenation; ``layer_norms(pieces)`` each piece's
    layer's L2 norm (a piece may be a fragment of a layer), ``global_norm(pieces)`` the
    norm of the whole space, identical on the ranks that share it.

    Implemented by :class:`ModuleParams` (the module's trainable parameters) and, under
    ZeRO replica groups, by ``thinwire.trainer.zero_replicas.ZeroShards`` (this rank's
    shard of the fp32 master weights: pieces are the fragments of the layers inside the
    shard, norms are reduced over the group)."""

    names: list[str]
    sizes: list[int]

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]: ...

    def read_flat(self) -> torch.Tensor: ...

    def write_flat(self, flat: torch.Tensor) -> None: ...

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]: ...

    def global_norm(self, pieces: list[torch.Tensor]) -> float: ...


class ModuleParams(ParamSpace):
    """The :class:`ParamSpace` of a module's trainable parameters: one piece per parameter,
    named by it; ``layer_norms`` is each parameter's norm."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [x.view_as(p) for x, p in zip(flat.split(self.sizes), self.params)]

    def read_flat(self) -> torch.Tensor:
        return self.flat(self.params)

    @torch.no_grad()
    def write_flat(self, flat: torch.Tensor) -> None:
        for p, x in zip(self.params, self.split(flat)):
            p.copy_(x)

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]:
        return [float(t.norm()) for t in pieces]

    def global_norm(self, pieces: list[torch.Tensor]) -> float:
        return global_norm(pieces)


def group_norm(norm: float, group, meter, device) -> float:
    """The L2 norm over ``group`` of the parts whose norms are ``norm`` on each rank (the squares
    summed in one fp64 scalar all-reduce, counted as control); ``norm`` itself when ``group`` is
    None or one rank. E.g. ``residual_norm`` over whole tensors from the local shards' residuals."""
    from . import accounting

    if group is None or accounting.group_size(group) <= 1:
        return norm
    sq = torch.tensor([norm * norm], dtype=torch.float64, device=device)
    accounting.all_reduce(meter, sq, group=group, kind="control")
    return math.sqrt(float(sq))


class Replicas(Protocol):
    """The replicas the outer loop averages over, and this rank's part of one.

    ``cross_group``: the ranks that hold the same part as this rank, one per replica (the
    outer average runs on it); ``cross_group2``: a second group over the same ranks for the
    two-phase collective's second phase (None: the averager makes one when needed);
    ``control_group``: the ranks that agree on skips and stop votes (None: the world);
    ``shard_group``: the ranks that hold the other parts of this rank's replica, when each holds
    a shard of every tensor (FSDP2's island; None: the rank's part is whole tensors, or the
    layout does not say), over which per-tensor metrics are summed (:func:`group_norm`);
    ``consensus_group``: the ranks whose consensus state must hash equal
    (``thinwire.trainer.drift``; None: the world); ``shards(model_params)``: the
    :class:`ParamSpace` of this rank's part; ``eval_space(model_params, space)``: what is
    averaged to evaluate while the replicas differ, and over which group (below).

    Implemented by :class:`DataParallel`, ``thinwire.trainer.zero_replicas.ReplicaGroups`` and
    ``thinwire.trainer.fsdp2_shards.Islands``."""

    cross_group: object
    cross_group2: object
    control_group: object
    consensus_group: object
    shard_group: object = None

    def shards(self, model_params: ModuleParams) -> ParamSpace: ...

    def eval_space(self, model_params: ModuleParams, space: ParamSpace) -> tuple[ParamSpace, object]:
        """``(params, group)``: evaluation reads ``params``, writes their mean over ``group``
        (None: the world; each rank counted once) for the duration, then writes the live values
        back; that mean must be the replicas' mean. ``model_params`` is the module's,
        ``space`` is ``shards(model_params)``."""
        ...


class DataParallel(Replicas):
    """Every rank of ``group`` one whole replica (``engine=ddp``): the outer average runs on
    ``world.async_group`` (its order never interleaves with the per-step control all-reduce),
    control and consensus on ``group`` (None: the world), the average on ``cross_group`` (a
    group over the same ranks; default ``world.async_group`` for the world, else ``group``);
    the space is the module's."""

    def __init__(self, world, group=None, cross_group=None):
        self.cross_group = cross_group if cross_group is not None else world.async_group if group is None else group
        self.cross_group2 = None
        self.control_group = self.consensus_group = group

    def shards(self, model_params: ModuleParams) -> ParamSpace:
        return model_params

    def eval_space(self, model_params: ModuleParams, space: ParamSpace) -> tuple[ParamSpace, object]:
        """The module's parameters over the control group (every rank one replica)."""
        return model_params, self.control_group
