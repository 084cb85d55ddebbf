"""The training loop of one worker, top to bottom.

    build:  data shard -> model (same init on every rank) -> optimizer plugin -> sync strategy
            -> engine (DDP + comm hook when gradients are synced every step) -> resume
    step:   batch(step) -> plugin.compute (forward, backward; DDP buckets -> comm hook)
            -> agree across ranks: mean loss + non-finite flag + Ctrl-C (one control all-reduce)
            -> accepted: plugin.apply, commit comm state, sync.after_step
               rejected: plugin.discard, discard comm state (buffers untouched)
            -> metrics line -> eval every N -> checkpoint every N / at stop_after / Ctrl-C / at the end

The engine is called through ``thinwire.trainer.interface.Engine`` only. What a benchmark
or a library user changes without copying the loop: the comm hook (``comm_hook=``, e.g.
torch's ``ddp_comm_hooks``), the optimizer plugin class (``plugin_cls=``), and, in a
subclass, when to evaluate (:meth:`Trainer.eval_due`), what an evaluation adds to the
metrics line (:meth:`Trainer.run_eval`) and when to stop early (:meth:`Trainer.stop_early`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Type

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ..comm import accounting
from ..comm.accounting import Stopwatch, WireMeter
from ..comm.hooks import CommHookFactory, comm_hook
from ..comm.sync import SYNC_STRATEGIES, build_sync
from ..config.resume import ResumeConfigError, check_resume_config
from ..errors import ConfigError, need, non_negative, positive
from ..optim.peft import apply_peft
from ..optim.plugins import OPTIMIZERS, OptimizerPlugin
from ..tensors import on_device
from .checkpoint import Checkpointer, assert_finite, resume_candidates, rng_state, set_rng_state
from .faults import FaultConfig, FaultInjector, restart_count
from .rundir import RunDirError, RunDirLock, check_rerun, effective_resume, move_aside, step_dirs
from .agreement import check_config_agreement
from .drift import DriftGuard
from .engine import build_engine
from .interface import Engine
from .loggers import MetricsFile, NullLogger
from .progress import Progress, StopRequest, say_stopped
from .world import World


MAX_SEED = 1 << 32                # seeds are mixed (seed * 1_000_003 + ...) into torch's 64-bit seeds
MAX_SAMPLE_CHARS = 10_000


@dataclass
class TrainerConfig:
    """``trainer``: the run's length, evaluation, checkpoints and faults."""
    max_steps: int = 600             # the run's length; fixes the LR schedule
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 200
    # none: a new run (refused where the run dir already holds one) | auto: continue from the
    # newest checkpoint that loads | <path to a checkpoint directory>
    resume: str = "none"
    overwrite: bool = False          # resume=none over an existing run: move it to <run dir>/previous/ first
    stop_after: Optional[int] = None  # end the process after this step, with a checkpoint
    log_every: int = 1
    progress: bool = True
    sample_chars: int = 200          # generated at the end (char LM only); 0 = none
    max_skipped_steps: int = 10      # consecutive non-finite steps before giving up
    keep_checkpoints: int = 3        # keep only the newest N checkpoints; 0 = keep all
    # replica-drift guard: hash the state every rank must hold bitwise equal every N steps (at a
    # round boundary); null = once per outer round, or every 100 steps under sync=ddp; 0 = off
    drift_check_every: Optional[int] = None
    # load checkpoint files whose loader unpickles arbitrary objects (engine=deepspeed: DeepSpeed's
    # own files); only for checkpoints you wrote yourself. thinwire's own files always load safely
    trust_checkpoints: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        positive(self, "max_steps", "eval_every", "checkpoint_every", "log_every")
        need(0 <= self.seed < MAX_SEED, "seed", self.seed, f"must be an int in [0, {MAX_SEED}) (2**32)")
        need(self.sample_chars <= MAX_SAMPLE_CHARS, "sample_chars", self.sample_chars,
             f"must be at most {MAX_SAMPLE_CHARS} (one forward pass per character)")
        need(self.stop_after is None or self.stop_after > 0, "stop_after", self.stop_after, "must be positive or null")
        non_negative(self, "max_skipped_steps", "sample_chars")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0 = keep all)")
        need(self.drift_check_every is None or self.drift_check_every >= 0, "drift_check_every",
             self.drift_check_every, "must be >= 0 (0 = off) or null (auto)")
        need(self.resume in ("none", "auto") or os.sep in self.resume or os.path.exists(self.resume), "resume",
             self.resume, "expected none, auto or a checkpoint directory")
        need(not self.overwrite or self.resume == "none", "overwrite", self.overwrite,
             f"starts a new run, so it needs resume=none (not {self.resume})")
        faults = self.faults if isinstance(self.faults, FaultConfig) else FaultConfig(**self.faults)
        faults.check()


class NonFiniteError(RuntimeError):
    pass


STOP_WEIGHT = 2.0 ** 20  # Ctrl-C's weight in the control packet's flag slot (> any world size)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model: torch.nn.Module, data, world: World, meter: WireMeter) -> float:
    """Mean loss over the fixed validation batches (:func:`evaluate_metrics`)."""
    return evaluate_metrics(model, data, world, meter)["val_loss"]


@torch.no_grad()
def evaluate_metrics(model: torch.nn.Module, data, world: World, meter: WireMeter) -> dict:
    """``val_loss``: the mean loss over the fixed validation batches, split across ranks (eval
    mode: no dropout, so the training RNG stream is untouched); ``val_accuracy`` too for a
    classifier: a model with ``logits(**inputs)`` on a data set with ``info.num_classes``, whose
    batches' ``y`` holds one label per sample (accuracy: argmax of the logits == y, over all
    validation samples)."""
    was_training = model.training
    model.eval()
    classifier = callable(getattr(model, "logits", None)) and data.info.num_classes > 0
    total = torch.zeros(4 if classifier else 2, dtype=torch.float64, device=world.device)
    for batch in data.eval_batches_for_rank():
        batch = to_device(batch, world.device)
        total[0] += model(**batch).double()
        total[1] += 1
        y = batch.get("y")
        if classifier and y is not None and y.dim() == 1:
            logits = model.logits(**{k: v for k, v in batch.items() if k != "y"})
            total[2] += (logits.argmax(-1) == y).sum()
            total[3] += y.numel()
    accounting.all_reduce(meter, total, kind="eval")
    model.train(was_training)
    out = {"val_loss": float(total[0] / total[1].clamp_min(1))}
    if classifier and total[3] > 0:
        out["val_accuracy"] = float(total[2] / total[3])
    return out


class Trainer:
    """One worker's training run (module docstring). ``comm_hook``: the factory of the DDP
    engine's per-bucket comm hook (``thinwire.comm.hooks.comm_hook``'s signature); a
    benchmark passes a peer's here. ``plugin_cls``: the optimizer plugin class (default: the
    one registered as ``optim.name``), called like the registered ones."""

    def __init__(self, cfg: DictConfig, world: World, *, comm_hook: CommHookFactory = comm_hook,
                 plugin_cls: Optional[Type[OptimizerPlugin]] = None):
        self.cfg, self.world = cfg, world
        t = cfg.trainer
        self.meter, self.watch = WireMeter(), Stopwatch()
        self.progress = Progress(t.max_steps, world.is_main, t.progress)
        self.progress.phase(f"loading data={cfg.data._target_.rsplit('.', 1)[-1]}")
        self.data = instantiate(cfg.data, seed=t.seed, rank=world.rank, world_size=world.world_size)
        torch.manual_seed(t.seed)  # identical initial parameters on every rank
        self.progress.phase(f"building the model ({cfg.model._target_})")
        model = instantiate(cfg.model, info=self.data.info).to(world.device)
        head_init = cfg.peft.get("head_init", "random")
        if cfg.peft.name != "none" or head_init != "random":
            self.progress.phase(f"setting up peft={cfg.peft.name} (head_init={head_init})")
        self.model = apply_peft(cfg.peft, model, data=self.data, world=world, meter=self.meter)
        plugin_cls = plugin_cls or OPTIMIZERS.get(cfg.optim.name, "optim")
        sync_cls = SYNC_STRATEGIES.get(cfg.sync.name, "sync")
        grad_sync = plugin_cls.needs_backprop and plugin_cls.needs_grad_allreduce and sync_cls.needs_grad_allreduce
        self.progress.phase(f"starting engine={cfg.engine.name} (comm={cfg.comm.name}, sync={cfg.sync.name}, "
                            f"optim={cfg.optim.name})")
        self.engine: Engine = build_engine(cfg.engine, self.model, world, self.meter, cfg.comm,
                                           grad_sync=grad_sync, comm_hook=comm_hook)
        plugin = plugin_cls(cfg.optim, self.model, max_steps=t.max_steps, world=world, meter=self.meter)
        self.plugin: OptimizerPlugin = self.engine.attach(plugin, cfg.data.batch_size)  # DeepSpeed takes the step
        self.sync = build_sync(cfg.sync, world, self.meter, self.model, cfg.comm, replicas=self.engine.replicas)
        self.sync.bind_optimizer(self.plugin)
        self.ckpt = Checkpointer(cfg.run_dir, world)
        self.faults = FaultInjector(t.faults, world.rank)
        self.drift = DriftGuard(t.get("drift_check_every"), self.sync, self.plugin, world, self.meter)
        # an elastic restart always continues from the newest checkpoint
        self.start_step = self.resume("auto" if restart_count() > 0 else t.resume)
        if self.start_step == 0:  # per-rank stream for dropout; a resume restores it instead
            torch.manual_seed(t.seed * 1_000_003 + world.rank)
        self.metrics = MetricsFile(cfg.run_dir, self.start_step) if world.is_main else None
        wandb_on = cfg.logger._target_.endswith("WandbLogger") and cfg.logger.get("mode") != "disabled"
        if world.is_main and wandb_on:
            self.progress.phase(f"starting wandb (logger.mode={cfg.logger.get('mode', '?')})")
        self.logger = self._logger()
        self.unit = self.data.info.unit

    def _logger(self):
        if not self.world.is_main:
            return NullLogger()
        kwargs = OmegaConf.to_container(self.cfg.logger, resolve=True)
        logger_cls = get_class(kwargs.pop("_target_"))
        return logger_cls(**kwargs, run_dir=self.cfg.run_dir,
                          run_config=OmegaConf.to_container(self.cfg, resolve=True))

    # -- checkpoint --------------------------------------------------------------
    def save(self, step: int) -> str:
        self.check_finite(step)
        per_rank = self.sync.ranks_diverge
        model_state = {"model": self.model.state_dict(), "optim": self.plugin.state_dict()}
        common = {"config": OmegaConf.to_yaml(self.cfg), "meter": self.meter.state_dict()}
        shard = {"rng": rng_state(), "comm": self.engine.comm_state_dict(), "sync": self.sync.state_dict()}
        (shard if per_rank else common).update(model_state)
        if not per_rank and self.plugin.per_rank_state:  # e.g. DeMo's momentum
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
        errors = self._gather(error) if self.world.world_size > 1 else [error]
        first = next((e for e in errors if e), None)
        if first:
            newest = step_dirs(self.cfg.run_dir)
            last = f"the newest checkpoint {newest[-1]} is the last one written" if newest else "no checkpoint was written"
            raise NonFiniteError(f"{first}: not checkpointed, {last}; the parameters overflowed "
                                 f"(optim.lr={self.cfg.optim.get('lr', '?')} too large?)")

    def _gather(self, obj) -> list:
        """Every rank's ``obj`` (control path only: failures and checks at checkpoints)."""
        out: list = [None] * self.world.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def resume(self, resume: str) -> int:
        """Load the newest checkpoint that every rank can read; fall back to older ones.

        Before any state is loaded, the checkpoint's config is compared with this run's
        (``thinwire.config.resume``): a change that a resume cannot take is refused, on every
        rank with the same line. If checkpoints exist but none loads, the run fails rather
        than start again from step 0 over them (``trainer.resume=auto``)."""
        candidates = resume_candidates(self.cfg.run_dir, resume)
        if candidates and self.engine.unpickles_checkpoints and \
                not self.cfg.trainer.trust_checkpoints:
            raise untrusted_engine_error(resume, self.cfg.engine.name)
        reasons = []
        for path in candidates:
            status, error = 0, None  # 0 loaded, 1 unusable, 2 written with another config
            try:
                loaded = self.ckpt.load(path)
                check_resume_config(loaded[0]["config"], self.cfg, path, resume, int(loaded[0]["step"]))
            except ResumeConfigError as e:
                status, error = 2, str(e)
            except Exception as e:  # noqa: BLE001 - truncated, corrupt, crafted, wrong version: "skip it"
                status, error = 1, f"{e.__class__.__name__}: {str(e)[:200]}" \
                    if not isinstance(e, ValueError) else str(e)[:200]
            flag = torch.tensor([float(status)], device=self.world.device)
            accounting.all_reduce(self.meter, flag, op=torch.distributed.ReduceOp.MAX, kind="setup")
            if flag.item() == 0.0:
                return self.load(path, *loaded)
            errors = self._gather((status, error)) if self.world.world_size > 1 else [(status, error)]
            worst = max(st for st, _ in errors)
            rank, reason = next((r, err) for r, (st, err) in enumerate(errors) if st == worst)
            if worst == 2:
                e = ResumeConfigError(reason)
                e.agreed = True
                raise e
            reasons.append(f"{os.path.basename(path)}: {reason}")
            if self.world.is_main:
                print(f"thinwire: checkpoint {path} is unusable (rank {rank}: {reason}); trying an older one",
                      flush=True)
        if resume not in ("auto", "none") or (resume == "auto" and step_dirs(self.cfg.run_dir)):
            incomplete = [f"{os.path.basename(d)}: no COMPLETE marker" for d in step_dirs(self.cfg.run_dir)
                          if d not in candidates] if resume == "auto" else []
            e = no_usable_checkpoint(resume, self.cfg.run_dir, reasons + incomplete)
            e.agreed = True
            raise e
        return 0

    def load(self, path: str, common: dict, shard: dict, same_world: bool) -> int:
        src = shard if "model" in shard else common
        self.model.load_state_dict(src["model"])
        self.plugin.load_state_dict(shard["optim"] if "optim" in shard else src["optim"])
        self.engine.load_extra(path, same_world)
        self.meter.load_state_dict(common["meter"])
        step = int(common["step"])
        if same_world:
            self.engine.load_comm_state_dict(on_device(shard["comm"], self.world.device))
            self.sync.load_state_dict(on_device(shard["sync"], self.world.device))
            set_rng_state(shard["rng"])
        else:
            torch.manual_seed(self.cfg.trainer.seed * 1_000_003 + self.world.rank + 7919 * step)
            if self.world.is_main:
                print(f"thinwire: warning: {path} was saved with another world size; model and "
                      f"optimizer restored, per-rank state reset (error-feedback buffers, sync state, "
                      f"RNG streams)", flush=True)
        if self.world.is_main:
            print(f"thinwire: resumed from {path} at step {step}", flush=True)
        return step

    # -- one step ------------------------------------------------------------------
    def agree(self, loss: torch.Tensor, finite: bool) -> tuple[float, bool]:
        """One control all-reduce carries both the loss (for logging) and the non-finite
        flag, so every rank skips a step together.

        Under local updates / CO2 (``sync.ranks_diverge``) ranks step independently within a
        round, so there is nothing to agree on per step: a rank skips its own non-finite
        step, no per-step collective adds a link round trip, and the loss logged is rank
        0's own."""
        agreed = self.plugin.agreement()  # zeroth order: agreed inside the plugin's own exchange
        # Ctrl-C: with one rank its own request; with several, one that the packet carried (below)
        self.stop_agreed = bool(self.interrupt.requested) and self.world.world_size == 1
        if agreed is not None:
            return agreed
        if self.sync.ranks_diverge:
            value = float(loss)
            return value, finite and math.isfinite(value)
        # the second slot counts non-finite ranks plus STOP_WEIGHT per rank that saw Ctrl-C:
        # every rank reads the same sum, so all stop after this step (no extra byte on the wire)
        flags = (0.0 if finite else 1.0) + (STOP_WEIGHT if self.interrupt.requested else 0.0)
        packet = torch.tensor([float(loss), flags], dtype=torch.float64, device=self.world.device)
        t0 = time.perf_counter()
        accounting.all_reduce(self.meter, packet, kind="control")
        self.watch.add(time.perf_counter() - t0)
        loss_mean = float(packet[0]) / self.world.world_size
        flags = int(packet[1])
        self.stop_agreed = flags >= STOP_WEIGHT
        return loss_mean, flags % STOP_WEIGHT == 0 and torch.isfinite(packet[0]).item()

    def stops_together(self) -> bool:
        """Whether Ctrl-C can stop every rank after the same step: one rank, a per-step
        control all-reduce (:meth:`agree`) to carry the request, or, under local/co2
        (``sync.ranks_diverge``), the synchronisations' own (``SyncStrategy.carries_stop``:
        the run stops at the next one). A plugin that agrees inside its own exchange (zeroth
        order) has none, and adding one would cost a link round trip per step: there Ctrl-C
        interrupts at once."""
        own = getattr(type(self.plugin), "agreement", OptimizerPlugin.agreement)
        carried = not self.sync.ranks_diverge or self.sync.carries_stop
        return self.world.world_size == 1 or (carried and own is OptimizerPlugin.agreement) or self.drift_votes()

    def drift_votes(self) -> bool:
        """Zeroth order on several ranks: Ctrl-C rides on the periodic replica check's all-gather
        (``DriftGuard.check(stop=...)``), so the run stops at the next check, no byte per step."""
        own = getattr(type(self.plugin), "agreement", OptimizerPlugin.agreement)
        return own is not OptimizerPlugin.agreement and self.world.world_size > 1 and self.drift.period > 0

    def train_step(self, step: int) -> dict:
        batch = to_device(self.data.train_batch(step), self.world.device)
        t0 = time.perf_counter()
        self.engine.set_lr(self.plugin.lr(step))
        with self.faults.poison_gradients(self.model, step + 1, self.plugin.needs_backprop):
            loss = self.plugin.compute(self.engine.forward_model, batch)
        self.watch.add(self.engine.comm_tail_s(time.perf_counter(), t0))
        loss_mean, ok = self.agree(loss, self.plugin.local_finite())
        record: dict = {"step": step + 1, "loss": loss_mean}
        if ok:
            record.update(self.plugin.apply(step))
            self.engine.commit()
            record.update(self.engine.take_comm_stats())
            self.skipped = 0
        else:
            self.plugin.discard()
            self.engine.discard()
            self.engine.take_comm_stats()
            self.skipped += 1
            self.skipped_total += 1
            record["lr"] = self.plugin.lr(step)
            if self.sync.ranks_diverge:  # skipped by this rank alone: metrics.jsonl shows rank 0's count only
                print(f"thinwire: rank {self.world.rank}: step {step + 1} skipped (non-finite loss or gradients "
                      f"on this rank); {self.skipped_total} skipped here so far", flush=True)
        # under local updates / CO2 a rank skips a step on its own, and the round's outer
        # collective still needs it (SyncStrategy.global_step, as thinwire.OuterLoop calls it)
        self.sync.stop_vote = bool(self.interrupt.requested)  # carried by a synchronisation (carries_stop)
        sync_metrics = self.sync.global_step(step, skipped=not ok)
        if self.sync.stop_agreed:  # every rank reads the same votes: all stop after this step
            self.stop_agreed, self.sync.stop_agreed = True, False
        self.watch.add(sync_metrics.pop("comm_wait_s", 0.0))  # time blocked on the sync's collectives
        record.update(sync_metrics)
        if self.drift.due(step + 1):
            self.faults.corrupt(self.drift.state(), step + 1)
            vote = self.drift_votes() and bool(getattr(self, "interrupt", None) and self.interrupt.requested)
            skipped = self.drift.check(step + 1, self.skipped_total, stop=vote)
            self.stop_agreed = self.stop_agreed or self.drift.stop_agreed
            if self.sync.ranks_diverge:  # each rank skips alone: every rank's count, not only rank 0's
                record.update({f"skipped_steps/rank{r}": n for r, n in skipped.items()})
        dt = time.perf_counter() - t0
        sent = self.meter.take()  # thinwire.meter.ByteCounts, as a library user reads it
        record.update({
            "step_time_s": dt,
            "comm_wait_s": self.watch.take(),
            "wire_bytes": sent.wire,
            "control_bytes": sent.control,
            "dense_bytes": accounting.dense_reference_bytes(self.engine.numel, self.world.world_size),
            f"{self.unit}_per_s": self.data.info.items_per_batch * self.world.world_size / max(dt, 1e-9),
            "skipped_steps": self.skipped_total,
        })
        return record

    def run(self) -> dict:
        t = self.cfg.trainer
        last = t.max_steps if t.stop_after is None else min(t.max_steps, t.stop_after)
        self.skipped, self.skipped_total = 0, 0
        self.progress.start(self.start_step, self.unit)
        record: dict = {}
        at_sync = self.world.world_size > 1 and self.sync.ranks_diverge  # Ctrl-C: progress.StopRequest
        when = ("at the next synchronisation" if at_sync else f"at the next replica check (every "
                f"{self.drift.period} steps: trainer.drift_check_every)" if self.drift_votes() else "after this step")
        self.interrupt = interrupt = StopRequest(self.stops_together(), self.world.is_main, when)
        self.stop_agreed = False
        for step in range(self.start_step, last):
            record = self.train_step(step)
            done = step + 1
            if self.skipped > t.max_skipped_steps:
                if not self.sync.ranks_diverge:  # ranks agreed: all of them save together
                    self.save(done)  # nothing changed since the last good step: this is its state
                where = (f"on rank {self.world.rank}; resume from the newest checkpoint"
                         if self.sync.ranks_diverge else "the last good state is checkpointed")
                raise NonFiniteError(f"trainer.max_skipped_steps={t.max_skipped_steps}: {self.skipped} "
                                     f"consecutive steps had non-finite gradients (step {done}); {where}")
            if self.eval_due(done):
                self.run_eval(record)
            self.log(record)
            self.progress.step(record)
            ctrl_c = self.stop_agreed or (self.world.world_size == 1 and bool(interrupt.requested))
            stop = self.stop_early(record) or ctrl_c
            if done % t.checkpoint_every == 0 or done == last or stop:
                path = self.save(done)
            if stop or (done == last < t.max_steps):
                self.progress.close()
                if self.world.is_main:
                    say_stopped(self.cfg.run_dir, done, "Ctrl-C" if ctrl_c else
                                "trainer.stop_after" if done == t.stop_after else "stopped early", path)
            if stop:
                if ctrl_c:  # for thinwire.train.worker (not logged): a sweep starts no further run
                    record = {**record, "stopped_by": "Ctrl-C"}
                break
            self.faults.after_step(done)
        self.progress.close()
        return record

    # -- what a subclass may change (module docstring) ---------------------------------
    def eval_due(self, done: int) -> bool:
        """Whether to evaluate after ``done`` steps: every ``trainer.eval_every`` and at the end."""
        t = self.cfg.trainer
        return done % t.eval_every == 0 or done == t.max_steps

    def run_eval(self, record: dict) -> None:
        """Evaluate (every rank together) into the step's ``record``: ``val_loss`` and
        ``eval_bytes``, the evaluation's traffic (never part of ``wire_bytes``)."""
        with self.sync.eval_model() as model:
            record.update(evaluate_metrics(model, self.data, self.world, self.meter))
        sent = self.meter.take()
        record["eval_bytes"] = sent.eval
        record["wire_bytes"] += sent.wire

    def stop_early(self, record: dict) -> bool:
        """Called after each step's metrics line; True ends the run after this step, with a
        checkpoint (as ``trainer.stop_after`` does). Every rank must answer the same."""
        return False

    def log(self, record: dict) -> None:
        if self.metrics is not None and (record["step"] % self.cfg.trainer.log_every == 0 or "val_loss" in record):
            self.metrics.log(record)
            self.logger.log(record, step=record["step"])

    def close(self) -> None:
        if getattr(self, "interrupt", None) is not None:
            self.interrupt.restore()
        self.progress.close()
        self.sync.close()
        if self.metrics is not None:
            self.metrics.close()
        self.logger.finish()

    def sample(self, n_chars: int) -> str | None:
        """A short generated continuation from rank 0 (char LM only), with its own generator."""
        info = self.data.info
        with self.sync.eval_model() as model:  # collective: every rank enters
            if not (n_chars > 0 and hasattr(model, "generate") and info.encode is not None):
                return None
            if not self.world.is_main:
                return None
            model.eval()
            prompt = torch.tensor([info.encode("\n")], device=self.world.device)
            gen = torch.Generator(device=self.world.device).manual_seed(self.cfg.trainer.seed)
            out = model.generate(prompt, n_chars, generator=gen)[0].tolist()
            return info.decode(out[1:])


def untrusted_engine_error(resume: str, engine: str) -> ConfigError:
    e = ConfigError(f"trainer.resume={resume}: engine={engine} checkpoints are read by the engine's own "
                    f"loader, which unpickles them (a crafted file could run code); to resume from "
                    f"checkpoints you wrote yourself, set trainer.trust_checkpoints=true")
    e.agreed = True  # every rank decides the same, from the same files
    return e


def no_usable_checkpoint(resume: str, run_dir: str, reasons: list[str]) -> RunDirError:
    where = os.path.join(run_dir, "checkpoints") if resume == "auto" else resume
    return RunDirError(f"trainer.resume={resume}: no checkpoint in {where} can be loaded "
                       f"({'; '.join(reasons)[:600]}); not starting over from step 0 on top of them: repair "
                       f"or move them, or start a new run in another hydra.run.dir")


def take_run_dir(cfg: DictConfig, world: World) -> RunDirLock | None:
    """Rank 0 takes the run dir's lock and checks a rerun cannot overwrite a run
    (``thinwire.trainer.rundir``); with ``trainer.overwrite=true`` it moves the old run
    aside. Every rank raises the same error (one line) if that fails."""
    lock, error = None, None
    if world.is_main:
        try:
            lock = RunDirLock(cfg.run_dir, wait_s=30.0 if restart_count() > 0 else 2.0)
            resume = effective_resume(cfg.trainer.resume)
            overwrite = cfg.trainer.get("overwrite", False) and restart_count() == 0
            check_rerun(cfg.run_dir, resume, overwrite)
            if overwrite and resume == "none":
                moved = move_aside(cfg.run_dir)
                if moved:
                    print(f"thinwire: trainer.overwrite=true: the previous run is in {moved}", flush=True)
        except ConfigError as e:
            error = str(e)
    if world.world_size > 1:
        errors: list = [None] * world.world_size
        torch.distributed.all_gather_object(errors, error)
        error = errors[0]
    if error:
        if lock is not None:
            lock.release()
        e = RunDirError(error)
        e.agreed = True
        raise e
    return lock


def train(cfg: DictConfig, world: World) -> dict:
    os.makedirs(cfg.run_dir, exist_ok=True)
    check_config_agreement(cfg, world)
    lock = take_run_dir(cfg, world)
    try:
        trainer = Trainer(cfg, world)
        try:
            record = trainer.run()
            if world.is_main and "val_loss" in record:
                print(f"thinwire: step {record['step']} val_loss {record['val_loss']:.4f}", flush=True)
            text = trainer.sample(cfg.trainer.sample_chars) if record.get("step") == cfg.trainer.max_steps else None
            if text:
                print("thinwire: sample:\n" + text, flush=True)
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()
    return record
