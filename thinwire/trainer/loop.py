"""The training loop of one worker, top to bottom.

    build:  data shard -> model (same init on every rank) -> optimizer plugin -> sync strategy
            -> engine (DDP + comm hook when gradients are synced every step) -> resume
    step:   batch(step) -> plugin.compute (forward, backward; DDP buckets -> comm hook)
            -> agree across ranks: mean loss + non-finite flag + Ctrl-C (one control all-reduce)
            -> accepted: plugin.apply, commit comm state, sync.after_step
               rejected: plugin.discard, discard comm state (buffers untouched)
            -> metrics line -> eval every N -> checkpoint every N / at stop_after / Ctrl-C / at the end

Beside the loop, each in its own module: the options (``trainer_config.TrainerConfig``),
saving and resuming (``resume.RunState``), when every rank stops together
(``stop.StopAgreement``: Ctrl-C, ``trainer.stop_after``) and the run dir's owner
(``rundir.take_run_dir``). The engine is called through ``thinwire.trainer.interface.Engine`` only. What a benchmark
or a library user changes without copying the loop: the comm hook (``comm_hook=``, e.g.
torch's ``ddp_comm_hooks``), the optimizer plugin class (``plugin_cls=``), and, in a
subclass, when to evaluate (:meth:`Trainer.eval_due`), what an evaluation adds to the
metrics line (:meth:`Trainer.run_eval`) and when to stop early (:meth:`Trainer.stop_early`).
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Type

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ..comm import accounting
from ..comm.accounting import Stopwatch, WireMeter
from ..comm.hooks import CommHookFactory, comm_hook
from ..comm.sync import SYNC_STRATEGIES, build_sync
from ..elastic.absence import PlannedAbsence
from ..optim.peft import apply_peft
from ..optim.plugins import OPTIMIZERS, OptimizerPlugin
from .agreement import check_config_agreement
from .drift import DriftGuard
from .engine import build_engine
from .faults import FaultInjector, restart_count
from .interface import Engine
from .loggers import MetricsFile, NullLogger
from .progress import Progress, say_stopped
from .resume import NonFiniteError, RunState, no_usable_checkpoint, untrusted_engine_error  # noqa: F401
from .rundir import take_run_dir
from .stop import StopAgreement
from .trainer_config import TrainerConfig  # noqa: F401 - its earlier home
from .world import World


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
        self.slot, self.slots = self.place()  # whose batches this worker trains: rank of world size
        self.data = instantiate(cfg.data, seed=t.seed, rank=self.slot, world_size=self.slots)
        self.eval_data = self.data  # whose share of the validation batches it evaluates
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
        self.sync = self.make_sync()
        self.sync.bind_optimizer(self.plugin)
        self.faults = FaultInjector(t.faults, self.slot)
        self.drift = DriftGuard(t.get("drift_check_every"), self.sync, self.plugin, world, self.meter)
        self.state = RunState(cfg, world, self.model, self.plugin, self.engine, self.sync, self.meter)
        self.state.ckpt.write_fault = self.faults.checkpoint_write_error
        # an elastic restart always continues from the newest checkpoint
        self.start_step = self.state.resume("auto" if restart_count() > 0 else t.resume)
        # trainer.faults.absent_at: a slot sits out some outer rounds (thinwire/elastic/absence.py)
        self.absence = PlannedAbsence.of(t.faults.get("absent_at"), world.world_size, self.sync.round_steps)
        if self.absence is not None:
            self.sync.plan_absence(self.absence)
        if self.start_step == 0:  # per-rank stream for dropout; a resume restores it instead
            torch.manual_seed(t.seed * 1_000_003 + self.slot)
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

    # -- one step ------------------------------------------------------------------
    def save(self, step: int) -> str:
        return self.state.save(step)

    def agree(self, loss: torch.Tensor, finite: bool) -> tuple[float, bool]:
        """One control all-reduce carries the loss (for logging), the non-finite flag (every
        rank skips a step together) and Ctrl-C (``thinwire.trainer.stop``).

        Under local updates / CO2 (``sync.ranks_diverge``) ranks step independently within a
        round, so there is nothing to agree on per step: a rank skips its own non-finite
        step, no per-step collective adds a link round trip, and the loss logged is rank
        0's own."""
        agreed = self.plugin.agreement()  # zeroth order: agreed inside the plugin's own exchange
        self.stopping.begin_step()
        if agreed is not None:
            return agreed
        if self.sync.ranks_diverge:
            value = float(loss)
            return value, finite and math.isfinite(value)
        packet = torch.tensor([float(loss), self.stopping.flags(finite)], dtype=torch.float64, device=self.world.device)
        t0 = time.perf_counter()
        accounting.all_reduce(self.meter, packet, kind="control")
        self.watch.add(time.perf_counter() - t0)
        all_finite = self.stopping.read(float(packet[1]))
        return float(packet[0]) / self.world.world_size, all_finite and torch.isfinite(packet[0]).item()

    def train_step(self, step: int) -> dict:
        if self.absence is not None and not self.absence.trains(self.world.rank, step):
            self.stopping.begin_step()  # absent: no batch, no step; the round's collective still needs it
            return self.end_step(step, {"step": step + 1, "loss": float("nan"), "lr": self.plugin.lr(step)},
                                 True, time.perf_counter())
        if self.absence is not None and self.absence.rejoins(self.world.rank, step):
            self.plugin.optimizer.state.clear()  # the joiner's inner optimizer is fresh (docs/elastic.md)
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
        return self.end_step(step, record, ok, t0)

    def end_step(self, step: int, record: dict, ok: bool, t0: float) -> dict:
        """The rest of a step, every rank together: the sync, the drift guard, the timings."""
        # under local updates / CO2 a rank skips a step on its own, and the round's outer
        # collective still needs it (SyncStrategy.global_step, as thinwire.OuterLoop calls it)
        self.stopping.vote()  # carried by a synchronisation (SyncStrategy.carries_stop)
        sync_metrics = self.sync.global_step(step, skipped=not ok)
        self.stopping.after_sync()
        self.watch.add(sync_metrics.pop("comm_wait_s", 0.0))  # time blocked on the sync's collectives
        record.update(sync_metrics)
        if self.drift.due(step + 1):
            self.faults.corrupt(self.drift.state(), step + 1)
            skipped = self.drift.check(step + 1, self.skipped_total, stop=self.stopping.drift_vote())
            self.stopping.after_check(self.drift.stop_agreed)
            if self.sync.ranks_diverge:  # each rank skips alone: every rank's count, not only rank 0's
                record.update({f"skipped_steps/rank{r}": n for r, n in skipped.items()})
        dt = time.perf_counter() - t0
        sent = self.meter.take()  # thinwire.meter.ByteCounts, as a library user reads it
        # (numel, ranks) of the dense reference; engine=fsdp2: this rank's shard across the R replicas
        dense = getattr(self.engine, "dense_reference", (self.engine.numel, self.world.world_size))
        record.update({
            "step_time_s": dt,
            "comm_wait_s": self.watch.take(),
            "wire_bytes": sent.wire,
            "control_bytes": sent.control,
            "dense_bytes": accounting.allreduce_bytes(*dense),
            f"{self.unit}_per_s": self.data.info.items_per_batch * self.world.world_size / max(dt, 1e-9),
            "skipped_steps": self.skipped_total,
        })
        if sent.island:  # engine=fsdp2: inside the island (accounted), never in wire_bytes
            record["island_bytes"] = sent.island
        return record

    def run(self) -> dict:
        t = self.cfg.trainer
        self.skipped, self.skipped_total = 0, 0
        own = getattr(type(self.plugin), "agreement", OptimizerPlugin.agreement) is not OptimizerPlugin.agreement
        self.stopping = StopAgreement(self.world, self.sync, own, t.max_steps, t.stop_after, self.drift.period)
        self.progress.start(self.start_step, self.unit)
        record: dict = {}
        step = self.start_step
        while step < self.stopping.last:
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
            early = self.stop_early(record)
            why = self.stopping.why(done, early)
            if done % t.checkpoint_every == 0 or done == self.stopping.last or why:
                path = self.save(done)
            if why:
                self.progress.close()
                if self.world.is_main:
                    say_stopped(self.cfg.run_dir, done, why, path)
            if why == "Ctrl-C":  # for thinwire.train.worker (not logged): a sweep starts no further run
                record = {**record, "stopped_by": "Ctrl-C"}
                break
            if early:
                break
            self.faults.after_step(done)
            step = self.next_step(done)
        self.progress.close()
        return record

    # -- what a subclass may change (module docstring) ---------------------------------
    def place(self) -> tuple[int, int]:
        """(whose batches this worker trains, out of how many): its rank and the world size; an
        elastic slot (``thinwire.trainer.elastic_slot``) is one process training slot s of N."""
        return self.world.rank, self.world.world_size

    def make_sync(self):
        """The sync strategy ``sync.*`` names (an elastic slot's is the elastic round)."""
        return build_sync(self.cfg.sync, self.world, self.meter, self.model, self.cfg.comm,
                          replicas=self.engine.replicas)

    def next_step(self, done: int) -> int:
        """The step to train after ``done`` steps: the next one (an elastic slot that sat a round
        out and healed continues at the consensus round's first step)."""
        return done

    def eval_due(self, done: int) -> bool:
        """Whether to evaluate after ``done`` steps: every ``trainer.eval_every`` and at the end."""
        t = self.cfg.trainer
        return done % t.eval_every == 0 or done == t.max_steps

    def run_eval(self, record: dict) -> None:
        """Evaluate (every rank together) into the step's ``record``: ``val_loss`` and
        ``eval_bytes``, the evaluation's traffic (never part of ``wire_bytes``)."""
        with self.sync.eval_model() as model:
            record.update(evaluate_metrics(model, self.eval_data, self.world, self.meter))
        sent = self.meter.take()
        record["eval_bytes"] = sent.eval
        record["wire_bytes"] += sent.wire

    def stop_early(self, record: dict) -> bool:
        """Called after each step's metrics line; True ends the run after this step, with a
        checkpoint (as ``trainer.stop_after`` does). Every rank must answer the same."""
        return False

    def log(self, record: dict) -> None:
        if self.metrics is not None and (record["step"] % self.cfg.trainer.log_every == 0 or "val_loss" in record
                                         or "live_slots" in record):  # a planned absence's tape: every round
            self.metrics.log(record)
            self.logger.log(record, step=record["step"])

    def close(self) -> None:
        if getattr(self, "stopping", None) is not None:
            self.stopping.restore()
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
            if not self.world.is_main and not getattr(self.engine, "collective_forward", False):
                return None  # engine=fsdp2: every rank generates (each forward gathers parameters)
            model.eval()
            prompt = torch.tensor([info.encode("\n")], device=self.world.device)
            gen = torch.Generator(device=self.world.device).manual_seed(self.cfg.trainer.seed)
            out = model.generate(prompt, n_chars, generator=gen)[0].tolist()
            return info.decode(out[1:]) if self.world.is_main else None


def train(cfg: DictConfig, world: World, trainer_cls=None) -> dict:
    os.makedirs(cfg.run_dir, exist_ok=True)
    check_config_agreement(cfg, world)
    lock = take_run_dir(cfg, world)
    try:
        trainer = (trainer_cls or Trainer)(cfg, world)
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
