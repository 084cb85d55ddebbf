"""Local updates, CO2 and SparseLoCo in your own training loop (docs/library.md).

:class:`OuterLoop` wraps the sync strategy the trainer uses (``sync=local|co2`` and any
strategy registered in ``thinwire.comm.sync.SYNC_STRATEGIES`` that does not average
gradients every step), built by the same ``build_sync``, with the same comm layer
(compressor + error feedback + collective) for the pseudo-gradient average, so a loop of
your own gets exactly what ``thinwire-train sync=...`` computes.

The shape follows torchft's ``LocalSGD`` / ``DiLoCo`` context managers (meta-pytorch/torchft,
``torchft/local_sgd.py``): wrap the bare model (no DDP: nothing is all-reduced per step),
keep your inner optimizer, and leave the outer loop to the wrapper. Where we depart: torchft
counts inner steps from an optimizer post-step hook; here the loop calls
``outer.step(skipped=...)`` once per *global* step, on every rank, whether or not its
optimizer stepped. A rank that skips a step (non-finite gradients, a ``GradScaler`` skip)
must still reach the round boundary with the others, or the round's collective would pair
different rounds on different ranks and hang or mix them.

Under FSDP2 (``fully_shard`` inside islands, a 2-D ``("replicate", "shard")`` DeviceMesh as
torchtitan builds it), pass ``mesh=``: the loop then averages this rank's local shards over
the mesh's replicate dimension (``mesh_replicas``), as ``thinwire-train engine=fsdp2`` does.

Every rank must build the model with the same initial parameters (the anchor is read from
them at construction), as ``torch.manual_seed`` before building or loading one checkpoint
gives. Under local updates ranks hold different parameters between rounds: checkpoint
model and inner optimizer per rank, next to ``outer.state_dict()`` (per rank too).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from .comm.accounting import WireMeter
from .comm.hooks import check_fingerprint, comm_config
from .comm.sync import SYNC_STRATEGIES, SyncConfig, SyncStrategy, build_sync
from .errors import ConfigError, ResumeConfigError, need
from .options import resolve
from .trainer.world import current_world


def mesh_replicas(mesh, world, meter: WireMeter, model: torch.nn.Module, two_phase: bool):
    """The outer loop's replicas on a user's 2-D DeviceMesh ``("replicate", "shard")``: FSDP2
    shards over ``mesh["shard"]`` (an island), the outer average runs on ``mesh["replicate"]``
    over this rank's local shards (``thinwire.trainer.fsdp2_shards.Islands``, with the mesh's
    groups instead of groups of its own: ``Islands.from_mesh``)."""
    from .trainer.fsdp2_shards import Islands

    names = getattr(mesh, "mesh_dim_names", None)
    need(mesh.ndim == 2 and tuple(names or ()) == ("replicate", "shard"), "mesh", names,
         "OuterLoop takes a 2-D DeviceMesh with mesh_dim_names=('replicate', 'shard') "
         "(fully_shard on mesh['shard'], the outer loop over mesh['replicate'])")
    return Islands.from_mesh(mesh, world, meter, model, two_phase)


def sync_config(name: str, options: dict) -> DictConfig:
    """The config node of sync strategy ``name`` with ``options``, through the one resolver
    (``thinwire.options.resolve``: defaults filled in, typed, finite, checked as
    ``thinwire-train sync=<name> sync.<key>=...`` checks it; errors name ``sync.<key>=<value>``)."""
    cls = SYNC_STRATEGIES.get(name, "sync")
    return OmegaConf.create(resolve("sync", name, cls, options, base=SyncConfig))


class OuterLoop:
    """Sync strategy ``sync`` (``local``, ``co2``, ...) for a user loop.

    ``model``: the bare module every rank trains with its own inner optimizer. ``comm``: the
    pseudo-gradient average's comm config, a name (``"none"``: exact fp32 all-reduce) or a
    dict ``{"name": "topk", "ratio": 0.01, "feedback": "ef", ...}`` with the keys of the
    trainer's ``comm.*``. ``options``: the strategy's own keys (``local_steps``,
    ``outer_optim``, ``clip``, ``staleness_penalty``, ...; docs/sync.md). ``meter``: where
    wire bytes are counted (a fresh :class:`~thinwire.comm.accounting.WireMeter` by default).
    ``mesh``: under FSDP2, the 2-D ``("replicate", "shard")`` DeviceMesh the model was sharded
    on (``fully_shard(..., mesh=mesh["shard"])``): the outer loop averages local shards over
    ``mesh["replicate"]`` (:func:`mesh_replicas`); None: every rank one whole replica.
    Uses the default process group (all ranks must construct it together).
    """

    def __init__(self, model: torch.nn.Module, sync: str = "local", *,
                 comm: Union[str, dict] = "none", meter: Optional[WireMeter] = None,
                 device: Optional[torch.device] = None, mesh=None, **options):
        need(not isinstance(model, torch.nn.parallel.DistributedDataParallel), "model", type(model).__name__,
             "pass the module itself: local updates all-reduce nothing per step")
        cls = SYNC_STRATEGIES.get(sync, "sync")
        need(not cls.needs_grad_allreduce, "sync", sync,
             "averages gradients every step: register thinwire.comm.comm_hook(...) on your DDP model instead")
        comm = {"name": comm} if isinstance(comm, str) else dict(comm)
        self.comm_cfg = comm_config(comm.pop("name", "none"), **comm)
        self.cfg = sync_config(sync, options)
        if hasattr(cls, "check_run"):  # the cross-part rules the command line runs, for a bare module
            engine = "ddp" if mesh is None else "fsdp2"
            cls.check_run(OmegaConf.create({"sync": self.cfg, "comm": self.comm_cfg, "engine": {"name": engine},
                                            "model": {}}))
        self.meter = meter if meter is not None else WireMeter()
        self.world = current_world(device or next(model.parameters()).device)
        replicas = None
        if mesh is not None:
            need(cls.supports_replica_groups, "sync", sync, "cannot average local shards over a mesh's replicate group")
            from .trainer.deepspeed_config import is_two_phase

            replicas = mesh_replicas(mesh, self.world, self.meter, model, is_two_phase(OmegaConf.create(self.comm_cfg)))
        self.strategy: SyncStrategy = build_sync(self.cfg, self.world, self.meter, model, self.comm_cfg,
                                                 replicas=replicas)
        self.steps = 0          # global steps so far (the round clock)
        self.skipped = 0        # of them, skipped by this rank

    @property
    def fingerprint(self) -> dict:
        return {"sync": OmegaConf.to_container(self.cfg, resolve=True), "comm": dict(self.comm_cfg)}

    def step(self, skipped: bool = False) -> dict[str, float]:
        """Call once per global step on every rank, after the inner optimizer's step (or the
        decision to skip it: ``skipped=True``). At a round boundary this runs the outer step
        (and its collective); returns the strategy's metrics (``outer_round``, ...), ``{}``
        between boundaries."""
        metrics = self.strategy.global_step(self.steps, skipped=skipped)
        self.steps += 1
        self.skipped += int(skipped)
        return metrics

    @contextlib.contextmanager
    def eval_model(self):
        """The model to evaluate: the mean of the ranks' live parameters, swapped in for the
        duration (one counted all-reduce; every rank must enter)."""
        with self.strategy.eval_model() as model:
            yield model

    def close(self) -> None:
        """Finish the average still in flight (CO2)."""
        self.strategy.close()

    def __enter__(self) -> "OuterLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """This rank's state (anchor, outer optimizer, error feedback, in-flight mean, round
        clock, byte totals) with the config fingerprint and the rank."""
        return {"fingerprint": self.fingerprint, "rank": self.world.rank, "world_size": self.world.world_size,
                "steps": self.steps, "skipped": self.skipped, "sync": self.strategy.state_dict(),
                "meter": self.meter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; refused (one line) under another sync/comm config or rank."""
        check_fingerprint("OuterLoop state", state["fingerprint"], self.fingerprint)
        if (state["rank"], state["world_size"]) != (self.world.rank, self.world.world_size):
            raise ResumeConfigError(f"OuterLoop state: written by rank {state['rank']} of {state['world_size']}, "
                                    f"loaded on rank {self.world.rank} of {self.world.world_size}; the state is "
                                    f"per rank: load each rank's own file at the same world size")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self.strategy.load_state_dict(state["sync"])
        self.meter.load_state_dict(state["meter"])
