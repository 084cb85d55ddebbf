"""Validate a composed run config, before any process or process group starts.

Keys and types are enforced at compose time (``compose``); here each group's chosen option
checks its own values (the ``check`` of its options and of the group-wide keys, next to the
part's class), then the rules that span groups run, stated with the parts' capability flags
(``needs_backprop``, ``needs_grad_allreduce``, ``needs_exact_aggregation``, an engine's
``check_run``) rather than lists of names. Each failure is a ``ConfigError`` naming the key
and the value, printed as one line with exit status 2.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, need
from ..options import allows_inf, check_finite, run_checks
from .groups import fixed_groups, groups

# The parts (thinwire.comm, .optim, .trainer: the layers below this one) are imported where
# they are used, so that ``import thinwire.config`` does not load torch; none imports config.


def chosen_option(cfg: DictConfig, group: str) -> str | None:
    """The option a composed config uses in ``group``: its ``name``, or the option whose
    builder is its ``_target_`` (None for a user's own ``_target_``)."""
    g = groups()[group]
    node = cfg[group]
    if not g.target:
        return node.name
    for option in g.options():
        if g.schema(option)().__dict__["_target_"] == node.get("_target_"):
            return option
    return None


def check_group(cfg: DictConfig, group: str) -> None:
    """The chosen option's checks and the group-wide ones (``thinwire.options.run_checks``:
    the same checks every library entry point runs through ``thinwire.options.resolve``)."""
    g = groups()[group]
    option = chosen_option(cfg, group)
    if option is None:
        return
    values = OmegaConf.to_container(cfg[group], resolve=True)
    run_checks(group, g.schema(option), g.base, g.own(option), values)


def check_model_data(cfg: DictConfig) -> None:
    """The model can train on the data set's batches: the data class's ``batches`` is one of
    the model builder's ``needs_batches`` (parts that declare neither are not checked). Runs
    at compose time, before the data options' interpolations of model keys resolve."""
    g = groups()
    model, data = chosen_option(cfg, "model"), chosen_option(cfg, "data")
    if model is None or data is None:
        return
    needs = getattr(g["model"].part(model), "needs_batches", None)
    gives = getattr(g["data"].part(data), "batches", None)
    if needs is None or gives is None or gives in needs:
        return
    fits = [d for d in g["data"].options() if getattr(g["data"].part(d), "batches", None) in needs]
    raise ConfigError(f"data={data}: model={model} cannot train on it (it gives {gives} batches, model={model} "
                      f"needs {' or '.join(needs)}: data={', '.join(fits) or '?'})")


def validate(cfg: DictConfig) -> None:
    _check_finite(cfg)
    for name, schema in fixed_groups().items():
        run_checks(name, schema, None, schema, OmegaConf.to_container(cfg[name], resolve=True))
    for group in groups():
        check_group(cfg, group)
    _check_requires(cfg)
    _cross_group(cfg)
    _check_resume(cfg)


def _cross_group(cfg: DictConfig) -> None:
    """Rules between groups, from the parts' capability flags and their ``check_run``."""
    g = groups()
    plugin = g["optim"].part(cfg.optim.name)
    strategy = g["sync"].part(cfg.sync.name)
    if not plugin.needs_backprop:  # forward-only: it exchanges its own scalars every step
        need(cfg.comm.name == "none", "comm", cfg.comm.name, f"optim={cfg.optim.name} sends no gradients; "
             "use comm=none")
        need(strategy.needs_grad_allreduce, "sync", cfg.sync.name,
             f"optim={cfg.optim.name} synchronises every step itself; use sync=ddp")
    elif not plugin.needs_grad_allreduce:  # it exchanges its own (compressed) state
        need(cfg.comm.name == "none", "comm", cfg.comm.name, f"optim={cfg.optim.name} compresses and exchanges "
             "its own momentum (no gradient all-reduce); use comm=none")
        need(strategy.needs_grad_allreduce, "sync", cfg.sync.name,
             f"optim={cfg.optim.name} synchronises every step itself; use sync=ddp")
    need("batch_size" in cfg.data, "data", cfg.data.get("_target_"), "a data set needs a batch_size option")
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else cfg.dist.nproc
    need(cfg.trainer.faults.rank < world, "trainer.faults.rank", cfg.trainer.faults.rank,
         f"is not a rank of this run (world size {world}: dist.nproc or torchrun's WORLD_SIZE)")
    from ..elastic.absence import check_run as check_absence  # trainer.faults.absent_at (docs/elastic.md)
    check_absence(cfg, world, plugin)
    for group in ("optim", "sync", "engine", "peft"):
        part = g[group].part(cfg[group].name)
        if hasattr(part, "check_run"):
            part.check_run(cfg)
    _check_momentum_owner(cfg, plugin, strategy)
    from ..elastic.config import ElasticConfig, check_elastic, check_trainer  # elastic replicas (docs/elastic.md)
    if cfg.get("elastic") is not None:  # configs saved by earlier versions have no elastic group
        check_elastic(ElasticConfig(**cfg.elastic), sync=cfg.sync.name, slots=world, master_addr=cfg.dist.master_addr,
                      engine=cfg.engine.name, optim=cfg.optim.name, fragments=cfg.sync.get("fragments", 1))
        check_trainer(cfg, plugin)


def _check_momentum_owner(cfg: DictConfig, plugin, strategy) -> None:
    """A feedback rule that applies SGD's momentum itself (``keeps_momentum``: comm.feedback=dgc)
    needs every-step SGD with the optimizer's own momentum off, or the momentum is applied twice."""
    from ..comm.feedback import FEEDBACKS

    fb = cfg.comm.feedback
    if not FEEDBACKS.get(fb, "comm.feedback").keeps_momentum:
        return
    need(strategy.needs_grad_allreduce and plugin.needs_grad_allreduce, "comm.feedback", fb,
         f"corrects the momentum of SGD that synchronises every step; use sync=ddp and optim=sgd (not sync="
         f"{cfg.sync.name}, optim={cfg.optim.name})")
    need("momentum" in cfg.optim, "optim", cfg.optim.name,
         f"comm.feedback={fb} applies SGD's momentum itself (comm.momentum={cfg.comm.momentum}); "
         f"use optim=sgd optim.momentum=0")
    need(cfg.optim.momentum == 0, "optim.momentum", cfg.optim.momentum,
         f"comm.feedback={fb} applies the momentum itself (comm.momentum={cfg.comm.momentum}); set optim.momentum=0")


LOSSY_UNDER_ADAMW = ("topk", "chunk_topk", "sign1")   # measured: docs/comm.md, docs/optim.md


def advice(cfg: DictConfig) -> list[str]:
    """One-line start-up warnings for valid choices that measured poorly here: Top-K / sign
    gradient compression into AdamW every step (Adam's per-coordinate normalisation turns the
    bursts that error feedback releases into near-unit steps)."""
    from ..comm.sync import SYNC_STRATEGIES

    out = []
    every_step = SYNC_STRATEGIES.get(cfg.sync.name, "sync").needs_grad_allreduce
    if cfg.optim.name == "adamw" and every_step and cfg.comm.name in LOSSY_UNDER_ADAMW:
        out.append(f"comm={cfg.comm.name} with optim=adamw every step: Top-K/sign gradients into AdamW were "
                   f"+37-42% val loss vs dense at 160 steps here (bench/results/cluster.md); compress the momentum instead, optim=adam1bit "
                   f"(+2.7% at 1/9.9 of bf16's bytes) or optim=demo (+11% at 1/34, docs/optim.md), or use "
                   f"sync=local with experiment=sparseloco (+3.9% at 1/491, docs/quality.md)")
    sparse = cfg.comm.name in ("topk", "chunk_topk")
    if sparse and not every_step and cfg.comm.get("collective") == "two_phase":
        out.append(f"comm={cfg.comm.name} comm.collective=two_phase under sync={cfg.sync.name}: the owners' re-selection "
                   f"(top k of the summed entries, the rest kept in an owner residual) measured +15.9% val loss vs dense "
                   f"against the all-gather's +3.9% for SparseLoCo H=15 (3 seeds, docs/quality.md, issue 34); it sends "
                   f"0.57x the all-gather's bytes at 4 replicas, so keep the all-gather unless bytes at many replicas matter more")
    return out


def missing_module(module: str) -> bool:
    """``module`` cannot be imported (found without importing it: peft or transformers take seconds)."""
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _check_requires(cfg: DictConfig) -> None:
    """The optional packages of the chosen parts (a part's ``requires``: module -> the install
    command) are installed: one line naming the option and the command, not a worker's traceback."""
    for name, g in groups().items():
        option = chosen_option(cfg, name)
        if option is None:
            continue
        for module, install in getattr(g.part(option), "requires", {}).items():
            need(not missing_module(module), name, option, f"needs the package {module}, which is not installed; "
                 f"install it with: {install}")


def _check_finite(cfg: DictConfig) -> None:
    """Every float option is finite (``thinwire.options.check_finite``), except the keys the
    chosen options declare as taking inf for "off" (``allows_inf``, e.g. ``sync.clip=.inf``)."""
    allowed = set()
    for name, g in groups().items():
        option = chosen_option(cfg, name)
        if option is not None:
            allowed |= allows_inf(name, g.own(option))
    check_finite(OmegaConf.to_container(cfg, resolve=True), "", allowed)


def _check_resume(cfg: DictConfig) -> None:
    """The run dir, before any process starts (``thinwire.trainer.rundir``): not owned by a
    running job, not a finished run that ``resume=none`` would overwrite, and, when resuming,
    a checkpoint that loads safely and was written with a compatible config (the same walk
    as the workers', ``thinwire.trainer.resume``)."""
    from ..trainer.faults import restart_count
    from ..trainer.resume import check_before_start
    from ..trainer.rundir import check_rerun, check_writable, effective_resume, probe_lock

    run_dir, t = cfg.run_dir, cfg.trainer
    check_writable(run_dir)
    r = effective_resume(t.resume)
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):  # a worker's rank 0 takes the lock itself
        probe_lock(run_dir)
    check_rerun(run_dir, r, t.overwrite and restart_count() == 0)
    check_before_start(cfg, r, groups()["engine"].part(cfg.engine.name).unpickles_checkpoints)
