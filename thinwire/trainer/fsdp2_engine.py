"""``engine=fsdp2``: FSDP2 (``torch.distributed.fsdp.fully_shard``) and HSDP under thinwire's loop.

The world is split into islands of ``engine.shard_group_size`` (S) consecutive ranks
(default: the ranks of one machine), R = world / S replicas (``thinwire.trainer.fsdp2_shards``).
``fully_shard`` wraps every block of the model (the children of its ``ModuleLists``), then
the root (tied embeddings stay in the root).

- ``sync=ddp`` (``comm=none``): gradients reduce-scattered inside the island and, with R > 1,
  all-reduced across islands: native HSDP on a 2-D ``("replicate", "shard")`` mesh (R = 1:
  plain FSDP2 on a 1-D mesh).
- ``sync=ddp comm=<compressor>``: FSDP2 on the 1-D island mesh, then after backward each
  local gradient shard is compressed and averaged over the replicate group with error
  feedback by the DDP comm hook's own state (:func:`aggregate_shards`; the post-backward
  design of torchft's HSDP all-reduce hook, without its overlap).
- ``sync=local|diloco|co2`` (any ``comm=`` for the outer average): FSDP2 on the 1-D island
  mesh (islands step together), thinwire's outer loop across islands on this rank's local
  shards (``fsdp2_shards.Islands`` / ``LocalShards``), unchanged.

Checkpoints: the model and the inner optimizer are written with Distributed Checkpoint
(``torch.distributed.checkpoint``) into thinwire's atomic step directory: ``dcp/``,
world-wide, when every replica holds the same state (``sync=ddp``); ``replica{r}/``, one per
island (``process_group`` = the island), when replicas diverge (local/co2). A world-wide save
of diverged replicas would be silently wrong: DCP treats equal names at equal offsets as
replicated, keeps one writer's copy, and every replica would restore a mix. Loading reads
DCP's metadata through an allowlist unpickler and its non-tensor items with
``weights_only=True`` (``fsdp2_shards.safe_reader``/``safe_planner``). Per-rank state (RNG,
the outer loop's anchor, outer momentum, error feedback) stays in the rank files. For a resume
under another island size the divergent per-rank state is also saved per island as DTensors
placed like the parameters, which DCP reshards by global offsets (``FSDP2Engine.load_extra``):
per-step compression's error feedback in ``feedback{r}/``, the outer loop's state
(``fsdp2_outer_state``) under ``outer`` in ``replica{r}/``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import OmegaConf

from ..comm import accounting, hooks
from ..comm.param_space import group_norm
from ..errors import ConfigError, ResumeConfigError
from ..tensors import on_device
from . import fsdp2_outer_state, fsdp2_shards
from .checkpoint import safe_load
from .fsdp2_shards import Islands
from .interface import CommStateMethods, Engine

SUPPORTED = ("engine=fsdp2 works with sync=ddp (comm=none: FSDP2/HSDP; comm=<compressor>: per-step compression "
             "across islands), or sync=local|diloco|co2 across islands "
             "of engine.shard_group_size ranks (any comm= for the outer average); a backprop optim that steps a "
             "torch optimizer (sgd|adamw), optim=demo (update_rule=sign) or optim=adam1bit; peft=none; torch >= 2.7")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class FSDP2Options:
    shard_group_size: Optional[int] = None   # S: ranks per island (FSDP2 shards inside); null = ranks per machine
    reshard_after_forward: bool = True       # False: keep gathered parameters from forward to backward
    param_dtype: Optional[str] = None        # mixed precision: compute dtype (fp32|bf16|fp16; null = the parameters')
    reduce_dtype: Optional[str] = None       # gradient reduction dtype (null = param_dtype)

    def check(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{key}={value}: expected one of {', '.join(DTYPES)} or null")
        if self.shard_group_size is not None and self.shard_group_size < 1:
            raise ConfigError(f"shard_group_size={self.shard_group_size}: must be >= 1 (ranks per island) or null")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_config(cfg) -> None:
    """What ``engine=fsdp2`` supports, from the parts' capability flags; one ConfigError line
    naming key and value, before any process group."""
    from ..comm.sync import SYNC_STRATEGIES
    from ..optim.plugins import OPTIMIZERS

    def need(cond: bool, key: str, value, why: str) -> None:
        if not cond:
            raise ConfigError(f"{key}={value}: {why}; {SUPPORTED}")

    need(torch_version() >= (2, 7), "engine", "fsdp2", f"needs torch >= 2.7 (installed: {torch.__version__})")
    world = int(os.environ.get("WORLD_SIZE", cfg.dist.nproc))
    size = fsdp2_shards.shard_group_size(cfg.engine.shard_group_size, world)
    need(size >= 1 and world % size == 0, "engine.shard_group_size", cfg.engine.shard_group_size,
         f"must divide the world size ({world}) into islands of equal size")
    strategy = SYNC_STRATEGIES.get(cfg.sync.name, "sync")
    need(strategy.needs_grad_allreduce or strategy.supports_replica_groups, "sync", cfg.sync.name,
         "this strategy cannot run across islands")
    if strategy.needs_grad_allreduce:
        need(cfg.comm.name not in hooks.HOOKS, "comm", cfg.comm.name,
             "a DDP bucket hook; FSDP2 compresses its gradient shards with thinwire's compressors only")
    plugin = OPTIMIZERS.get(cfg.optim.name, "optim")
    on_shards = getattr(plugin, "exchanges_on_shards", False)  # e.g. DeMo: its own exchange, on local shards
    need(plugin.needs_backprop and (on_shards or plugin.needs_grad_allreduce and plugin.steps_torch_optimizer),
         "optim", cfg.optim.name, "FSDP2 reduces backprop gradients for a torch optimizer (DCP checkpoints its "
         "state) or a plugin that exchanges on local shards")
    refusal = plugin.shard_refusal(cfg.optim) if on_shards else None
    if refusal:
        need(False, *refusal)
    need(cfg.peft.name == "none", "peft", cfg.peft.name, "adapters on sharded parameters are not implemented")
    eval_batches = cfg.data.get("eval_batches")
    need(not isinstance(eval_batches, int) or eval_batches % world == 0, "data.eval_batches", eval_batches,
         f"must be a multiple of the world size ({world}): every rank must run the same number of "
         f"forwards (FSDP2 gathers parameters in each)")


def island_step_bytes(params: list[torch.Tensor], size: int, reshard_after_forward: bool,
                      param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> dict[str, int]:
    """Bytes this rank sends inside its island of ``size`` ranks in one training step through
    FSDP2's own collectives (``{"all_gather": ..., "reduce_scatter": ...}``), accounted from
    the parameters' shapes and dtypes with ``accounting.collective_bytes``, not measured
    (FSDP2 calls torch.distributed directly). Per parameter, FSDP2 pads dim 0 to a multiple
    of S (``torch.distributed.fsdp``'s ``_get_dim0_padded_size``), so each rank's shard is
    ``ceil(dim0 / S)`` rows: it is all-gathered in ``param_dtype`` (null: the parameter's) in
    forward and again in backward when ``reshard_after_forward`` (every unit, the root too: the
    engine sets the flag explicitly), and the padded gradient is reduce-scattered in
    ``reduce_dtype`` (null: ``param_dtype``). The sums are the same whatever the units'
    grouping. HSDP's all-reduce across islands is not here (``FSDP2Engine.replicate_bytes``)."""
    gather = scatter = 0
    for p in params:
        dim0 = p.shape[0] if p.dim() else 1
        shard = math.ceil(dim0 / size) * (p.numel() // max(dim0, 1))
        compute = param_dtype or p.dtype
        gather += accounting.collective_bytes("all_gather", shard, compute.itemsize, size)
        scatter += accounting.collective_bytes("reduce_scatter", shard * size, (reduce_dtype or compute).itemsize, size)
    return {"all_gather": gather * (2 if reshard_after_forward else 1), "reduce_scatter": scatter}


def aggregate_shards(state: "hooks.CompressedState", model: torch.nn.Module) -> None:
    """Per-step compression under FSDP2, after backward: each trainable parameter's local
    gradient shard (after the island's reduce-scatter) goes through the DDP comm hook's
    aggregator (``thinwire.comm.hooks.CompressedState.launch``: compressor, error feedback
    keyed by the global parameter name, the collective) over the replicate group, and the
    mean is written back in place. Compression is per local shard: at S = 1 the shard is
    the whole tensor (the same bits as ``engine=ddp``'s per-parameter compression); at S > 1
    a per-tensor rule (Top-K's k, a quantiser's scale) applies per shard. Empty shards
    (dim 0 shorter than S) are skipped (their sizes agree across the replicate group)."""
    named = [(n, fsdp2_shards.local(p.grad)) for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None]
    named = [(n, g) for n, g in named if g.numel() > 0]
    flats = [g.view(-1) for _, g in named]
    means = state.launch([n for n, _ in named], flats).wait()
    with torch.no_grad():
        for flat, mean in zip(flats, means):
            flat.copy_(mean)


class FSDP2Engine(CommStateMethods, Engine):
    """The loop's engine (``thinwire.trainer.interface.Engine``) over FSDP2 (module doc)."""

    Config = FSDP2Options
    check_run = staticmethod(check_config)
    unpickles_checkpoints = False  # DCP metadata through an allowlist; non-tensor items weights_only
    owns_model_state = True        # model + optimizer in DCP files, not in thinwire's rank files
    collective_forward = True      # every forward gathers parameters: all ranks sample together

    def __init__(self, cfg, model: torch.nn.Module, world, meter, comm_cfg, *, grad_sync: bool,
                 comm_hook: hooks.CommHookFactory = hooks.comm_hook):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        from ..comm.compressors import is_exact
        from .deepspeed_config import is_two_phase

        if comm_hook is not hooks.comm_hook:
            raise ValueError("engine=fsdp2: FSDP2 reduces gradients itself; no comm hook can be plugged in")
        self.cfg, self.module, self.world, self.meter = cfg, model, world, meter
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.grad_sync = grad_sync
        # sync=ddp comm=<compressor>: FSDP2 inside the island, then the local gradient shards
        # compressed over the replicate group with error feedback (aggregate_shards)
        compressed = grad_sync and not is_exact(comm_cfg.name)
        size = fsdp2_shards.shard_group_size(cfg.shard_group_size, world.world_size)
        self.islands = Islands(world, size, meter, two_phase=(compressed or not grad_sync) and is_two_phase(comm_cfg))
        self.islands.model = model
        # sync=ddp comm=none: native HSDP across islands; otherwise FSDP2 inside the island only
        self.mesh = self.islands.mesh(two_d=grad_sync and not compressed and self.islands.replicas > 1)
        self.replicas = None if grad_sync else self.islands
        param_dtype = DTYPES.get(cfg.param_dtype) if cfg.param_dtype else None
        reduce_dtype = DTYPES.get(cfg.reduce_dtype) if cfg.reduce_dtype else None
        kw = {"mesh": self.mesh, "reshard_after_forward": cfg.reshard_after_forward,
              "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
        for block in [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        for method in ("logits", "features"):  # non-forward entry points gather parameters too
            if callable(getattr(model, method, None)):
                register_fsdp_forward_method(model, method)
        self.forward_model = model
        self.optimizer, self.plugin = None, None
        self.sync = None  # the outer loop (bind_sync): its state is saved resharding-ready with the model
        # HSDP's per-step all-reduce of this rank's gradient shard across islands (the slow links):
        # estimated from tensor sizes, charged as data once per step. FSDP2's own all-gather and
        # reduce-scatter inside the island: accounted likewise, charged as kind "island"
        # (island_bytes, never in wire_bytes; docs/fsdp2.md "Bytes")
        trainable = [p for p in model.parameters() if p.requires_grad]
        local_numel = sum(fsdp2_shards.local(p).numel() for p in trainable)
        size = (reduce_dtype or param_dtype or torch.float32).itemsize
        self.replicate_bytes = accounting.collective_bytes("all_reduce", local_numel, size, self.islands.replicas) \
            if grad_sync and not compressed and self.islands.replicas > 1 else 0
        self.island_bytes = island_step_bytes(trainable, self.islands.size, cfg.reshard_after_forward, param_dtype,
                                              reduce_dtype)
        # the dense reference (dense_bytes): an fp32 all-reduce of this rank's shard across the R replicas
        self.dense_reference = (local_numel, self.islands.replicas)
        if compressed:  # the DDP hook's state: aggregator, EF rescaling, warm-up, staging, checkpoint
            fields = OmegaConf.to_container(comm_cfg, resolve=True)
            self.hook_state, _ = comm_hook(fields.pop("name"), process_group=self.islands.cross_group,
                                           second_group=self.islands.cross_group2 or self.islands.cross_group,
                                           meter=meter, model=model, auto_commit=False, **fields)

    def attach(self, plugin, batch_size: int):
        self.optimizer = getattr(plugin, "optimizer", None)
        self.plugin = plugin
        if getattr(plugin, "exchanges_on_shards", False):  # DeMo, 1-bit Adam: their exchange runs across islands
            plugin.exchange_over(self.islands)
        return plugin

    def bind_sync(self, sync) -> None:
        """The run's sync strategy: under local/co2 its per-rank state goes into ``replica{r}/``
        as DTensors too, so a resume under another island size reshards it."""
        self.sync = sync

    # the loop's engine interface (CommStateMethods: set_lr, commit, ... go to hook_state)
    def comm_tail_s(self, backward_end: float, step_start: float) -> float:
        """Called once per step after backward (accepted or not): HSDP's replicate all-reduce
        is charged; with per-step compression the local gradient shards are aggregated over
        the replicate group here, and the seconds it blocked are the tail."""
        if self.replicate_bytes:
            self.meter.charge(self.replicate_bytes, kind="data", collective="all_reduce",
                              group_size=self.islands.replicas)
        for collective, nbytes in self.island_bytes.items():
            if nbytes:
                self.meter.charge(nbytes, kind="island", collective=collective, group_size=self.islands.size)
        if not isinstance(self.hook_state, hooks.CompressedState):
            return 0.0
        t0 = time.perf_counter()
        aggregate_shards(self.hook_state, self.module)
        return time.perf_counter() - t0

    # -- checkpoints: Distributed Checkpoint inside thinwire's atomic step directory ----------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer or [])
        return {"model": model_sd, "optim": optim_sd}

    def _where(self, directory: str, replica: int | None = None) -> tuple[str, object]:
        """(directory, process group): world-wide ``dcp/`` when replicas agree, else per island."""
        if self.replicas is None:
            return os.path.join(directory, "dcp"), None
        r = self.islands.replica if replica is None else replica
        return os.path.join(directory, f"replica{r}"), self.islands.shard_group

    def _outer_loop(self) -> bool:
        """An outer loop across islands is bound (sync=local|co2; not sync=ddp under optim=demo)."""
        return self.replicas is not None and getattr(self.sync, "supports_replica_groups", False)

    def _plugin_file(self, directory: str) -> str | None:
        """Where an optimizer plugin's per-rank state outside any torch optimizer goes (DeMo,
        1-bit Adam: shaped by the local shards)."""
        if not getattr(self.plugin, "exchanges_on_shards", False):
            return None
        return os.path.join(directory, f"optim{self.world.rank:05d}.pt")

    def _layout(self) -> dict:
        return {"shard_group_size": self.islands.size, "replicas": self.islands.replicas}

    def save_extra(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        fsdp2_shards.reshard(self.module)
        path, group = self._where(directory)
        state = {**self._state(), "layout": self._layout()}
        if self._outer_loop():
            space = self.sync.space
            state["outer"] = fsdp2_shards.as_dtensors(fsdp2_outer_state.pieces(
                self.sync.state_dict(), space.names, space.sizes, self.sync.plan.fragments), self.module)
        dcp.save(state, checkpoint_id=path, process_group=group)
        if self._plugin_file(directory):  # DeMo's momentum, 1-bit Adam's: per rank, local shapes (same layout only)
            torch.save(self.plugin.state_dict(), self._plugin_file(directory))
        if isinstance(self.hook_state, hooks.CompressedState):  # per-step EF: divergent, one save per island
            state = self.hook_state
            dcp.save({"feedback": fsdp2_shards.feedback_dtensors(state.aggregator.feedback.state_dict(), self.module),
                      "iteration": state.iteration, "lr_prev": state.lr_prev},
                     checkpoint_id=os.path.join(directory, f"feedback{self.islands.replica}"),
                     process_group=self.islands.shard_group)

    def load_extra(self, directory: str, same_world: bool) -> bool:
        """Model and inner optimizer from DCP (resharded to this layout). A changed layout
        (``engine.shard_group_size`` or the world size) reshards the divergent per-rank state:
        under ``sync=ddp`` per-step error feedback from this island's ``feedback{r}/``; under
        local/co2 the outer loop's whole state (anchor, outer optimizer, CO2's state in flight,
        error feedback) from ``replica{r}/``, loaded into the bound strategy here (returns True:
        the rank files' sync state is not for this layout). Error feedback is kept when the
        replica count is the same, else reset; one warning line says which."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        fsdp2_shards.reshard(self.module)
        path, group = self._where(directory)
        if not os.path.isdir(path):  # fewer islands than replicas saved: every island takes replica 0's
            path, group = self._where(directory, 0)
            if self.world.is_main:
                print(f"thinwire: warning: {directory} holds no replica{self.islands.replica}/; every island "
                      f"loads replica0/", flush=True)
        reader = fsdp2_shards.safe_reader(path)
        state = self._state()
        if any(k.startswith("layout.") for k in reader.read_metadata().state_dict_metadata):
            state["layout"] = {"shard_group_size": 0, "replicas": 0}
        dcp.load(state, storage_reader=reader, planner=fsdp2_shards.safe_planner(), process_group=group)
        set_state_dict(self.module, self.optimizer or [], model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        saved = state.get("layout", self._layout())
        self.relaid = saved != self._layout() or not same_world
        if self._plugin_file(directory):
            if self.relaid:
                raise ResumeConfigError(
                    f"engine.shard_group_size={self.islands.size}: {directory} was saved with islands of "
                    f"{saved['shard_group_size']} ranks; optim={self.plugin.__class__.__name__}'s per-rank state is "
                    f"shaped by the local shards and is not resharded: resume with "
                    f"engine.shard_group_size={saved['shard_group_size']} on the same world size")
            self.plugin.load_state_dict(on_device(torch.load(self._plugin_file(directory), weights_only=True),
                                                  self.world.device))
        if self.relaid and isinstance(self.hook_state, hooks.CompressedState):
            self._reshard_feedback(directory, saved)
        if self.relaid and self._outer_loop():
            self._reshard_outer(directory, path, group, saved)
            return True
        return False

    def _reshard_outer(self, directory: str, path: str, group, saved: dict) -> None:
        """The outer loop's state of ``path`` (``replica{r}/``), resharded to this layout."""
        import torch.distributed.checkpoint as dcp

        reader = fsdp2_shards.safe_reader(path)
        keys = [k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("outer.")]
        if not keys:
            raise ResumeConfigError(
                f"engine.shard_group_size={self.islands.size}: {directory} was saved with islands of "
                f"{saved['shard_group_size']} ranks by a version that kept the outer loop's state in the rank "
                f"files only: resume with engine.shard_group_size={saved['shard_group_size']}")
        loaded = {"outer": fsdp2_shards.templates({k: k.split("/", 1)[1] for k in keys}, self.module)}
        dcp.load(loaded, storage_reader=reader, planner=fsdp2_shards.safe_planner(), process_group=group)
        same = saved["replicas"] == self.islands.replicas
        rank_file = safe_load(os.path.join(directory, "rank00000.pt"))["sync"]  # consensus scalars
        state = fsdp2_outer_state.restore(rank_file, fsdp2_shards.local_flats(loaded["outer"]), self.sync.space.names,
                                          self.sync.plan.fragments, keep_feedback=same)
        self.sync.load_state_dict(on_device(state, self.world.device))
        why = "error feedback resharded" if same else \
            f"error feedback reset ({saved['replicas']} replicas saved, {self.islands.replicas} now)"
        if self.world.is_main:
            print(f"thinwire: warning: {directory}: islands of {saved['shard_group_size']} ranks saved, "
                  f"{self.islands.size} now: model, optimizer and the outer loop's state resharded, {why}",
                  flush=True)

    def _reshard_feedback(self, directory: str, saved: dict) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.hook_state
        path = os.path.join(directory, f"feedback{min(self.islands.replica, saved['replicas'] - 1)}")
        reader = fsdp2_shards.safe_reader(path)
        keys = [k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("feedback.")]
        loaded = {"feedback": fsdp2_shards.feedback_templates(keys, self.module), "iteration": 0, "lr_prev": 0.0}
        dcp.load(loaded, storage_reader=reader, planner=fsdp2_shards.safe_planner(),
                 process_group=self.islands.shard_group)
        state.iteration, state.lr_prev = int(loaded["iteration"]), loaded["lr_prev"]
        state.aggregator.server_errors = {}  # two-phase owners' residuals: sized by the old layout
        if saved["replicas"] == self.islands.replicas:
            state.aggregator.feedback.load_state_dict(fsdp2_shards.feedback_store(loaded["feedback"]))
            why = "error feedback resharded"
        else:
            why = f"error feedback reset ({saved['replicas']} replicas saved, {self.islands.replicas} now)"
        if self.world.is_main:
            print(f"thinwire: warning: {directory}: islands of {saved['shard_group_size']} ranks saved, "
                  f"{self.islands.size} now: model and optimizer resharded, {why}", flush=True)

    def take_comm_stats(self) -> dict:
        """The comm hook's metrics; ``residual_norm`` over the whole tensors: the squares of the
        island's local shards summed (one fp64 scalar all-reduce in the island: control, as the
        local shards' norms are; island_bytes stays FSDP2's accounted collectives alone)."""
        stats = super().take_comm_stats()
        if "residual_norm" in stats:
            stats["residual_norm"] = group_norm(stats["residual_norm"], self.islands.shard_group, self.meter,
                                                self.world.device)
        return stats

    def load_comm_state_dict(self, state: dict) -> None:
        if not getattr(self, "relaid", False):  # a new layout took the resharded state in load_extra
            super().load_comm_state_dict(state)
