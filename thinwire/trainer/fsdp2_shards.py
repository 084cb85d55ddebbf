"""The outer loop on FSDP2 shards (``engine=fsdp2`` with ``sync=local|diloco|co2``): the
replica layout, the :class:`~thinwire.comm.param_space.ParamSpace` of this rank's local
shards, and the safe reader of Distributed Checkpoint (DCP) files.

Layout (``engine.shard_group_size`` = S consecutive ranks per island, R = world / S)::

    world 4, S 2:   shard groups (FSDP2's mesh)     {0,1} {2,3}
                    cross groups (the outer average) {0,2} {1,3}

FSDP2 shards every parameter on dim 0 over the island (``torch.chunk``: trailing ranks may
hold fewer rows, or none). Rank j of every island holds the same rows of every parameter,
so the outer loop averages local shards over the cross group: anchor, outer momentum,
error-feedback residuals and CO2's in-flight state are 1/S of the model per rank, named by
the global parameter name (``thinwire.comm.param_space.Replicas``, as ZeRO's
``thinwire.trainer.zero_replicas``).
"""
from __future__ import annotations

import functools
import io
import math
import os
import pickle

import torch

from ..comm import accounting
from ..comm.groups import new_group
from ..comm.param_space import ModuleParams, ParamSpace, Replicas, global_norm
from ..tensors import local_shard as local


def shard_group_size(cfg_size, world_size: int) -> int:
    """``engine.shard_group_size``, or the ranks of one machine (``LOCAL_WORLD_SIZE``) when null."""
    if cfg_size:
        return int(cfg_size)
    return min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP unit back to its sharded parameters (an eval forward leaves the root's
    parameters unsharded: a write to the shards must not be shadowed by a stale gathered copy)."""
    for m in fsdp_modules(model):
        m.reshard()


class Islands(Replicas):
    """The process groups of the layout (module doc), all through
    ``thinwire.comm.groups.new_group`` (``world.timeout_s``), created in the same order on
    every rank; the outer loop's ``thinwire.comm.param_space.Replicas`` (as ZeRO's
    ``ReplicaGroups``): the outer average on the cross group; skips and stop votes over the
    world (an island's ranks step together, and each sees only its own shard of Delta); the
    consensus (anchor, outer state: this rank's shard) equal across the cross group;
    evaluation averages the local shards over the cross group (``eval_space``); inner
    moments over a copy of the cross group (``moment_group``).
    ``mesh(two_d)``: FSDP2's DeviceMesh, 1-D over the island, or 2-D ``("replicate",
    "shard")`` (native HSDP) built on the same groups."""

    def __init__(self, world, size: int, meter, two_phase: bool):
        p = world.world_size
        self.world, self.meter, self.model = world, meter, None
        self.size, self.replicas = size, p // size
        self.replica, self.index = divmod(world.rank, size)
        group = functools.partial(new_group, timeout_s=world.timeout_s)
        shard = [group(list(range(g * size, (g + 1) * size))) for g in range(self.replicas)]
        cross = [group(list(range(j, p, size))) for j in range(size)]
        cross2 = [group(list(range(j, p, size))) for j in range(size)] if two_phase else [None] * size
        self.shard_group, self.cross_group = shard[self.replica], cross[self.index]
        self.cross_group2 = cross2[self.index]
        self.control_group, self.consensus_group = None, self.cross_group
        self._cross_ranks, self._moment_groups = [list(range(j, p, size)) for j in range(size)], None

    @classmethod
    def from_mesh(cls, mesh, world, meter, model, two_phase: bool) -> "Islands":
        """The layout of a user's 2-D DeviceMesh ``("replicate", "shard")`` (``thinwire.OuterLoop``):
        the mesh's own groups; a second replicate group per shard index for two_phase's second
        phase (made here, on every rank in the same order)."""
        self = cls.__new__(cls)
        self.world, self.meter, self.model = world, meter, model
        self.replicas, self.size = mesh.size(0), mesh.size(1)
        self.replica, self.index = mesh.get_local_rank("replicate"), mesh.get_local_rank("shard")
        self.shard_group, self.cross_group = mesh.get_group("shard"), mesh.get_group("replicate")
        self._cross_ranks = [mesh.mesh[:, j].tolist() for j in range(self.size)]
        second = [new_group(ranks, timeout_s=world.timeout_s) for ranks in self._cross_ranks] \
            if two_phase and self.replicas > 1 else [None] * self.size
        self.cross_group2 = second[self.index]
        self.control_group, self.consensus_group = None, self.cross_group
        self._moment_groups = None
        return self

    def moment_group(self):
        """The cross group's ranks in a group of their own, for averaging the inner optimizer's
        moments (local shards) while co2's average may be in flight on the cross group. Made on
        first call, which every rank makes (the strategy's construction)."""
        if self._moment_groups is None:
            self._moment_groups = [new_group(ranks, timeout_s=self.world.timeout_s) for ranks in self._cross_ranks]
        return self._moment_groups[self.index]

    def mesh(self, two_d: bool):
        from torch.distributed.device_mesh import DeviceMesh

        dev = self.world.device.type  # always named (pytorch#132471)
        if two_d:
            layout = torch.arange(self.world.world_size).view(self.replicas, self.size)
            return DeviceMesh.from_group([self.cross_group, self.shard_group], dev, mesh=layout,
                                         mesh_dim_names=("replicate", "shard"))
        return DeviceMesh.from_group(self.shard_group, dev, mesh_dim_names=("shard",))

    def shards(self, model_params: ModuleParams) -> "LocalShards":
        """The outer loop's space: this rank's local shards."""
        return LocalShards(model_params, self)

    def eval_space(self, model_params: ModuleParams, space: ParamSpace) -> tuple[ParamSpace, object]:
        """The local shards over the cross group: rank j's mean is rows j of the replicas'
        mean, so the module (gathered in the island by each forward) is the replicas' mean.
        The module's own parameters are DTensors: their world-wide mean is not this."""
        return space, self.cross_group


class LocalShards(ParamSpace):
    """This rank's local shards (``DTensor.to_local()``), one piece per trainable parameter,
    named by its global name; a piece may be empty (dim 0 shorter than S). Sizes agree across
    a cross group. ``write_flat`` reshards first, then copies into the shards in place;
    ``layer_norms``/``global_norm`` add the squares over the island (one small all-reduce);
    at S = 1 they are ``ModuleParams``' (fp32 norm per tensor, fp64 sum): engine=ddp's bits."""

    def __init__(self, model_params: ModuleParams, islands: Islands):
        self.islands = islands
        self.names = list(model_params.names)
        self.params = list(model_params.params)
        self.sizes = [local(p).numel() for p in self.params]
        self.model = islands.model

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(self.sizes))

    def read_flat(self) -> torch.Tensor:
        return self.flat([local(p) for p in self.params])

    @torch.no_grad()
    def write_flat(self, flat: torch.Tensor) -> None:
        if self.model is not None:
            reshard(self.model)
        for p, x in zip(self.params, self.split(flat)):
            t = local(p)
            t.copy_(x.view(t.shape))

    def _squares(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        dev = pieces[0].device if pieces else self.islands.world.device
        sq = torch.stack([t.double().pow(2).sum() for t in pieces]) if pieces else torch.zeros(0, dtype=torch.float64)
        sq = sq.to(dev)
        if self.islands.size > 1:
            accounting.all_reduce(self.islands.meter, sq, group=self.islands.shard_group, kind="control")
        return sq

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]:
        if self.islands.size == 1:  # whole tensors: ModuleParams' own rule, the same bits as engine=ddp
            return [float(t.norm()) for t in pieces]
        return [float(x) for x in self._squares(pieces).sqrt()]

    def global_norm(self, pieces: list[torch.Tensor]) -> float:
        if self.islands.size == 1:
            return global_norm(pieces)
        return math.sqrt(float(self._squares(pieces).sum()))


# -- Distributed Checkpoint: loading never unpickles anything outside an allowlist -----------
DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "MetadataIndex", "TensorProperties", "BytesStorageMetadata",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class UnsafeDCPError(ValueError):
    pass


def _enum_member(cls, name: str):
    """``builtins.getattr`` as some Pythons pickle an enum member (``getattr(Enum, name)``: the
    3.11.2 of Debian 12 does so for DCP's ``_MEM_FORMAT_ENCODING``), allowed only for a member of
    an allowlisted enum: a general getattr would reach any method of any allowed object."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    if cls is _MEM_FORMAT_ENCODING and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise UnsafeDCPError(f"DCP metadata is refused: loading it would call getattr({cls!r}, {name!r}) "
                         f"(only members of DCP's own enums are allowed)")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        torch_dtype = module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
        if torch_dtype or name in DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeDCPError(f"DCP metadata is refused: loading it would call {module}.{name} "
                             f"(only DCP's metadata classes, torch dtypes and paths are allowed)")


def safe_reader(path: str):
    """A ``FileSystemReader`` whose ``.metadata`` goes through an allowlist unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
                metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def safe_planner():
    """DCP's default load planner, reading non-tensor items with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


# -- per-rank state as DTensors placed like the parameters: DCP reshards it by global offsets --
def as_dtensors(pieces: dict, model: torch.nn.Module) -> dict:
    """``{key: (parameter name, flat local shard)}`` -> ``{key: DTensor}`` shaped and placed like
    that parameter (on its device: state kept elsewhere, e.g. anchors on the host, is copied):
    saved per island, they reload resharded into another island size."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    out = {}
    for key, (name, t) in pieces.items():
        p = params[name]
        t = t.reshape(local(p).shape).to(local(p).device)
        out[key] = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
    return out


def templates(names: dict, model: torch.nn.Module) -> dict:
    """``{key: parameter name}`` -> zero fp32 DTensors placed like that parameter, for
    ``dcp.load`` to fill."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return {k: torch.zeros_like(params[n], dtype=torch.float32) for k, n in names.items()}


def local_flats(tensors: dict) -> dict:
    """This rank's flat local shard of each DTensor."""
    return {k: local(t).reshape(-1).clone() for k, t in tensors.items()}


# error feedback of per-step compression, keyed "<name>/<buffer>"
def feedback_dtensors(store: dict, model: torch.nn.Module) -> dict:
    """The feedback rule's buffers (``{name: {buf: flat local shard}}``) as DTensors keyed
    ``"<name>/<buf>"`` (:func:`as_dtensors`)."""
    return as_dtensors({f"{n}/{b}": (n, t) for n, bufs in store.items() for b, t in bufs.items()}, model)


def feedback_templates(keys, model: torch.nn.Module) -> dict:
    return templates({k: k.rsplit("/", 1)[0] for k in keys}, model)


def feedback_store(tensors: dict) -> dict:
    """Inverse of :func:`feedback_dtensors`: this rank's flat local shards by name and buffer."""
    store: dict = {}
    for key, t in local_flats(tensors).items():
        name, buf = key.rsplit("/", 1)
        store.setdefault(name, {})[buf] = t
    return store
