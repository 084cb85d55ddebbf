"""A run's checkpoints: what a save holds, and which checkpoint a run resumes from.

    save:    refuse parameters holding inf/NaN (every rank agrees) -> common file (config,
             byte totals; model + optimizer when every rank holds the same) + one shard per
             rank (RNG, comm and sync state; model + optimizer where ranks diverge) -> prune
    resume:  walk the candidates newest first (:func:`walk`): the first that loads and was
             written with a config this run may resume (``resume_config``) wins; one that
             does not load falls back to an older one; a config change is refused; none
             usable while checkpoints exist is an error, never a silent restart from step 0.

The walk is written once and runs twice: before any process starts
(:func:`check_before_start`: the manifest and common file of each candidate) and on every
rank before any state is loaded (:meth:`RunState.resume`: this rank's shard too, the ranks
agreeing on each candidate's outcome with one all-reduce).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..comm import accounting
from ..errors import ConfigError, ResumeConfigError, need
from ..tensors import on_device
from .checkpoint import (Checkpointer, assert_finite, check_loadable, checkpoint_dirs, resume_candidates,
                         rng_state, set_rng_state)
from .resume_config import check_resume_config
from .rundir import RunDirError, step_dirs
from .world import World


class NonFiniteError(RuntimeError):
    pass


def untrusted_engine_error(resume: str, engine: str) -> ConfigError:
    # every rank decides the same, from the same files
    return ConfigError(f"trainer.resume={resume}: engine={engine} checkpoints are read by the engine's own "
                       f"loader, which unpickles them (a crafted file could run code); to resume from "
                       f"checkpoints you wrote yourself, set trainer.trust_checkpoints=true", agreed=True)


def no_usable_checkpoint(resume: str, run_dir: str, reasons: list[str]) -> RunDirError:
    where = os.path.join(run_dir, "checkpoints") if resume == "auto" else resume
    return RunDirError(f"trainer.resume={resume}: no checkpoint in {where} can be loaded "
                       f"({'; '.join(reasons)[:600]}); not starting over from step 0 on top of them: repair "
                       f"or move them, or start a new run in another hydra.run.dir", agreed=True)


@dataclass(frozen=True)
class Tried:
    """What trying one checkpoint gave on one rank: loaded, ``unusable`` (try an older one)
    or ``refused`` (written under a config this run cannot resume: stop)."""
    unusable: Optional[str] = None
    refused: Optional[str] = None

    @property
    def severity(self) -> float:
        """The ranks agree on the worst outcome: refused > unusable > loaded (a MAX all-reduce)."""
        return 2.0 if self.refused else 1.0 if self.unusable else 0.0


def reason(path: str, e: Exception) -> str:
    """A few words on why checkpoint ``path`` did not load (its own prefix dropped)."""
    msg = str(e).removeprefix(f"trainer.resume={path}: ")
    return msg[:200] if isinstance(e, ValueError) else f"{e.__class__.__name__}: {msg[:200]}"


def alone(tried: Tried) -> tuple[int, Tried]:
    return 0, tried


def walk(run_dir: str, resume: str, load: Callable[[str], object], agree: Callable = alone,
         say: Callable[[str, int, str], None] = lambda path, rank, why: None):
    """The checkpoint to resume from and what ``load(path)`` gave for it, or ``(None, None)``
    when there is none to resume from (``resume=none``, or ``auto`` in an empty run dir).
    ``load`` raises :class:`ResumeConfigError` for a config change, anything else for a file
    it cannot read; ``agree`` turns this rank's :class:`Tried` into the one every rank acts on
    (with the rank it came from); ``say`` reports a fallback."""
    candidates = resume_candidates(run_dir, resume)
    reasons = []
    for path in candidates:
        loaded, tried = None, Tried()
        try:
            loaded = load(path)
        except ResumeConfigError as e:
            tried = Tried(refused=str(e))
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, crafted, wrong version: "skip it"
            tried = Tried(unusable=reason(path, e))
        rank, tried = agree(tried)
        if tried.refused:
            raise ResumeConfigError(tried.refused, agreed=True)
        if not tried.unusable:
            return path, loaded
        reasons.append(f"{os.path.basename(path)}: {tried.unusable}")
        say(path, rank, tried.unusable)
    if resume not in ("auto", "none") or (resume == "auto" and step_dirs(run_dir)):
        incomplete = [f"{os.path.basename(d)}: no COMPLETE marker (an unfinished write)" for d in step_dirs(run_dir)
                      if d not in candidates] if resume == "auto" else []
        raise no_usable_checkpoint(resume, run_dir, reasons + incomplete)
    return None, None


def check_trusted(cfg: DictConfig, resume: str, unpickles: bool) -> None:
    if unpickles and not cfg.trainer.trust_checkpoints and resume_candidates(cfg.run_dir, resume):
        raise untrusted_engine_error(resume, cfg.engine.name)


def check_before_start(cfg: DictConfig, resume: str, unpickles: bool) -> None:
    """The walk before any process starts: each candidate's manifest, common file and rank
    files' presence, and the config it was written with."""
    if resume not in ("none", "auto"):
        need(os.path.isdir(resume), "trainer.resume", resume, "expected none, auto or a checkpoint directory")
        try:
            check_loadable(resume)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_trusted(cfg, resume, unpickles)

    def load(path: str) -> None:
        common = check_loadable(path)
        if isinstance(common, dict) and "config" in common:
            check_resume_config(common["config"], cfg, path, resume, int(common["step"]) if "step" in common else None)
    walk(cfg.run_dir, resume, load)


def gather(world: World, obj) -> list:
    """Every rank's ``obj`` (control path only: failures and checks at checkpoints)."""
    if world.world_size == 1:
        return [obj]
    out: list = [None] * world.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class RunState:
    """Saves and restores the state of one worker's run: the model, the optimizer plugin,
    the engine's comm state, the sync strategy, the byte meter and the RNG streams."""

    def __init__(self, cfg: DictConfig, world: World, model, plugin, engine, sync, meter):
        self.cfg, self.world = cfg, world
        self.model, self.plugin, self.engine, self.sync, self.meter = model, plugin, engine, sync, meter
        self.ckpt = Checkpointer(cfg.run_dir, world)
        if hasattr(engine, "bind_sync"):  # engine=fsdp2 checkpoints the outer loop's state reshardable
            engine.bind_sync(sync)

    def save(self, step: int) -> str:
        self.check_finite(step)
        per_rank = self.sync.ranks_diverge
        model_state = {"model": self.model.state_dict(), "optim": self.plugin.state_dict()}
        if getattr(self.engine, "owns_model_state", False):  # engine=fsdp2: both in the engine's DCP files
            model_state = {}
        common = {"config": OmegaConf.to_yaml(self.cfg), "meter": self.meter.state_dict()}
        shard = {"rng": rng_state(), "comm": self.engine.comm_state_dict(), "sync": self.sync.state_dict()}
        (shard if per_rank else common).update(model_state)
        if not per_rank and self.plugin.per_rank_state and model_state:  # e.g. DeMo's momentum
            shard["optim"] = common.pop("optim")
        path = self.ckpt.save(step, common, shard, extra=self.engine.save_extra)
        self.ckpt.prune(self.cfg.trainer.keep_checkpoints)
        return path

    def check_finite(self, step: int) -> None:
        """A checkpoint is the last good state: never write one whose parameters hold inf or
        NaN (finite gradients with an update that overflows, e.g. a huge learning rate).
        Ranks agree (under local/co2 their parameters differ), so all fail together."""
        try:
            assert_finite(self.model.named_parameters(), step)
            error = None
        except FloatingPointError as e:
            error = f"{e} on rank {self.world.rank}"
        first = next((e for e in gather(self.world, error) if e), None)
        if first:
            newest = step_dirs(self.cfg.run_dir)
            last = f"the newest checkpoint {newest[-1]} is the last one written" if newest else "no checkpoint was written"
            raise NonFiniteError(f"{first}: not checkpointed, {last}; the parameters overflowed "
                                 f"(optim.lr={self.cfg.optim.get('lr', '?')} too large?)")

    def agree(self, tried: Tried) -> tuple[int, Tried]:
        """The worst outcome over the ranks, and the first rank that had it."""
        flag = torch.tensor([tried.severity], device=self.world.device)
        accounting.all_reduce(self.meter, flag, op=torch.distributed.ReduceOp.MAX, kind="setup")
        if flag.item() == 0.0:
            return 0, tried
        every = gather(self.world, tried)
        return next((r, t) for r, t in enumerate(every) if t.severity == flag.item())

    def resume(self, resume: str) -> int:
        """Load the newest checkpoint that every rank can read (module docstring); the step
        to continue from (0: a new run)."""
        check_trusted(self.cfg, resume, self.engine.unpickles_checkpoints)

        def load(path: str):
            loaded = self.ckpt.load(path)
            check_resume_config(loaded[0]["config"], self.cfg, path, resume, int(loaded[0]["step"]))
            return loaded

        def say(path: str, rank: int, why: str) -> None:
            if self.world.is_main:
                print(f"thinwire: checkpoint {path} is unusable (rank {rank}: {why}); trying an older one", flush=True)

        path, loaded = walk(self.cfg.run_dir, resume, load, self.agree, say)
        return 0 if path is None else self.load(path, *loaded)

    def load(self, path: str, common: dict, shard: dict, same_world: bool) -> int:
        src = shard if "model" in shard else common
        if not getattr(self.engine, "owns_model_state", False):  # engine=fsdp2: load_extra restores both
            self.model.load_state_dict(src["model"])
            self.plugin.load_state_dict(shard["optim"] if "optim" in shard else src["optim"])
        resharded_sync = self.engine.load_extra(path, same_world)  # True: the engine restored the sync's state
        self.meter.load_state_dict(common["meter"])
        step = int(common["step"])
        if same_world:
            self.engine.load_comm_state_dict(on_device(shard["comm"], self.world.device))
            if not resharded_sync:
                self.sync.load_state_dict(on_device(shard["sync"], self.world.device))
            set_rng_state(shard["rng"])
        else:
            torch.manual_seed(self.cfg.trainer.seed * 1_000_003 + self.world.rank + 7919 * step)
            carried = not resharded_sync and self.sync.load_consensus_state(on_device(shard["sync"], self.world.device))
            reset = ("RNG streams" if resharded_sync else
                     "error-feedback buffers, the sync's per-rank state (its anchor and outer-optimizer state "
                     "carry over), RNG streams" if carried else "error-feedback buffers, sync state, RNG streams")
            if self.world.is_main:
                print(f"thinwire: warning: {path} was saved with another world size; model and "
                      f"optimizer restored, per-rank state reset ({reset})", flush=True)
        if self.world.is_main:
            print(f"thinwire: resumed from {path} at step {step}", flush=True)
        return step
