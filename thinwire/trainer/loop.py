"""The training loop of one worker, top to bottom.

    build:  data shard -> model (same init on every rank) -> optimizer plugin -> sync strategy
            -> engine (DDP + comm hook when gradients are synced every step) -> resume
    step:   batch(step) -> plugin.compute (forward, backward; DDP buckets -> comm hook)
            -> agree across ranks: mean loss + non-finite flag (one control all-reduce)
            -> accepted: plugin.apply, commit comm state, sync.after_step
               rejected: plugin.discard, discard comm state (buffers untouched)
            -> metrics line -> eval every N -> checkpoint every N / at stop_after / at the end
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..comm import accounting
from ..comm.accounting import Stopwatch, WireMeter
from ..comm.sync import SYNC_STRATEGIES, build_sync
from ..errors import need, non_negative, positive
from ..optim.peft import apply_peft
from ..optim.plugins import OPTIMIZERS
from .checkpoint import Checkpointer, resume_candidates, rng_state, set_rng_state
from .faults import FaultConfig, FaultInjector, restart_count
from .agreement import check_config_agreement
from .engine import build_engine
from .loggers import MetricsFile, NullLogger
from .world import World


@dataclass
class TrainerConfig:
    """``trainer``: the run's length, evaluation, checkpoints and faults."""
    max_steps: int = 600             # the run's length; fixes the LR schedule
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 200
    resume: str = "none"             # none | auto | <path to a checkpoint directory>
    stop_after: Optional[int] = None  # end the process after this step, with a checkpoint
    log_every: int = 1
    progress: bool = True
    sample_chars: int = 200          # generated at the end (char LM only); 0 = none
    max_skipped_steps: int = 10      # consecutive non-finite steps before giving up
    keep_checkpoints: int = 0        # keep only the newest N checkpoints; 0 = keep all
    faults: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        positive(self, "max_steps", "eval_every", "checkpoint_every", "log_every")
        need(self.stop_after is None or self.stop_after > 0, "stop_after", self.stop_after, "must be positive or null")
        non_negative(self, "max_skipped_steps", "sample_chars")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0 = keep all)")
        need(self.resume in ("none", "auto") or os.sep in self.resume or os.path.exists(self.resume), "resume",
             self.resume, "expected none, auto or a checkpoint directory")
        faults = self.faults if isinstance(self.faults, FaultConfig) else FaultConfig(**self.faults)
        faults.check()


class NonFiniteError(RuntimeError):
    pass


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, world: World, meter: WireMeter) -> float:
    """Mean loss over the fixed validation batches, split across ranks (eval mode: no
    dropout, so the training RNG stream is untouched)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    for batch in data.eval_batches_for_rank():
        total[0] += model(**to_device(batch, world.device)).double()
        total[1] += 1
    accounting.all_reduce(meter, total, kind="eval")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


class Trainer:
    def __init__(self, cfg: DictConfig, world: World):
        self.cfg, self.world = cfg, world
        t = cfg.trainer
        self.meter, self.watch = WireMeter(), Stopwatch()
        self.data = instantiate(cfg.data, seed=t.seed, rank=world.rank, world_size=world.world_size)
        torch.manual_seed(t.seed)  # identical initial parameters on every rank
        model = instantiate(cfg.model, info=self.data.info).to(world.device)
        self.model = apply_peft(cfg.peft, model, data=self.data, world=world, meter=self.meter)
        plugin_cls = OPTIMIZERS.get(cfg.optim.name, "optim")
        sync_cls = SYNC_STRATEGIES.get(cfg.sync.name, "sync")
        grad_sync = plugin_cls.needs_backprop and plugin_cls.needs_grad_allreduce and sync_cls.needs_grad_allreduce
        self.engine = build_engine(cfg.engine, self.model, world, self.meter, cfg.comm, grad_sync=grad_sync)
        self.plugin = plugin_cls(cfg.optim, self.model, max_steps=t.max_steps, world=world, meter=self.meter)
        self.plugin = self.engine.attach(self.plugin, cfg.data.batch_size)  # DeepSpeed takes over the step
        self.sync = build_sync(cfg.sync, world, self.meter, self.model, cfg.comm,
                               replicas=getattr(self.engine, "replicas", None))
        self.ckpt = Checkpointer(cfg.run_dir, world)
        self.faults = FaultInjector(t.faults, world.rank)
        # an elastic restart always continues from the newest checkpoint
        self.start_step = self.resume("auto" if restart_count() > 0 else t.resume)
        if self.start_step == 0:  # per-rank stream for dropout; a resume restores it instead
            torch.manual_seed(t.seed * 1_000_003 + world.rank)
        self.metrics = MetricsFile(cfg.run_dir, self.start_step) if world.is_main else None
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
        per_rank = self.sync.ranks_diverge
        model_state = {"model": self.model.state_dict(), "optim": self.plugin.state_dict()}
        common = {"config": OmegaConf.to_yaml(self.cfg), "meter": self.meter.state_dict()}
        shard = {"rng": rng_state(), "comm": self.engine.comm_state_dict(), "sync": self.sync.state_dict()}
        (shard if per_rank else common).update(model_state)
        if not per_rank and getattr(self.plugin, "per_rank_state", False):  # e.g. DeMo's momentum
            shard["optim"] = common.pop("optim")
        path = self.ckpt.save(step, common, shard, extra=self.engine.save_extra)
        self.ckpt.prune(self.cfg.trainer.keep_checkpoints)
        return path

    def resume(self, resume: str) -> int:
        """Load the newest checkpoint that every rank can read; fall back to older ones."""
        candidates = resume_candidates(self.cfg.run_dir, resume)
        for path in candidates:
            try:
                loaded, error = self.ckpt.load(path), None
            except Exception as e:  # noqa: BLE001 - truncated, corrupt, wrong version: all mean "skip it"
                loaded, error = None, f"{e.__class__.__name__}: {str(e)[:200]}"
            ok = torch.tensor([0.0 if loaded is None else 1.0], device=self.world.device)
            accounting.all_reduce(self.meter, ok, op=torch.distributed.ReduceOp.MIN, kind="setup")
            if ok.item() == 1.0:
                return self.load(path, *loaded)
            if self.world.is_main or error:
                print(f"thinwire: rank {self.world.rank}: checkpoint {path} is unusable "
                      f"({error or 'on another rank'}); trying an older one", flush=True)
        if candidates and resume not in ("auto", "none"):
            raise RuntimeError(f"trainer.resume={resume}: checkpoint could not be loaded")
        return 0

    def load(self, path: str, common: dict, shard: dict, same_world: bool) -> int:
        src = shard if "model" in shard else common
        self.model.load_state_dict(src["model"])
        self.plugin.load_state_dict(shard["optim"] if "optim" in shard else src["optim"])
        self.engine.load_extra(path, same_world)
        self.meter.load_state_dict(common["meter"])
        step = int(common["step"])
        if same_world:
            self.engine.load_comm_state_dict(shard["comm"])
            self.sync.load_state_dict(shard["sync"])
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
        if hasattr(self.plugin, "agreement"):  # zeroth order: agreed inside the plugin's own exchange
            return self.plugin.agreement()
        if self.sync.ranks_diverge:
            value = float(loss)
            return value, finite and math.isfinite(value)
        packet = torch.tensor([float(loss), 0.0 if finite else 1.0], dtype=torch.float64,
                              device=self.world.device)
        t0 = time.perf_counter()
        accounting.all_reduce(self.meter, packet, kind="control")
        self.watch.add(time.perf_counter() - t0)
        loss_mean = float(packet[0]) / self.world.world_size
        return loss_mean, bool(packet[1] == 0) and torch.isfinite(packet[0]).item()

    def train_step(self, step: int) -> dict:
        batch = to_device(self.data.train_batch(step), self.world.device)
        t0 = time.perf_counter()
        self.engine.set_lr(self.plugin.lr(step))
        with self.faults.poison_gradients(self.model, step + 1):
            loss = self.plugin.compute(self.engine.forward_model, batch)
        self.watch.add(self.engine.comm_tail_s(time.perf_counter(), t0))
        loss_mean, ok = self.agree(loss, self.plugin.local_finite())
        record: dict = {"step": step + 1, "loss": loss_mean}
        if ok:
            record.update(self.plugin.apply(step))
            self.engine.commit()
            record.update(self.engine.take_comm_stats())
            sync_metrics = self.sync.after_step(step)
            self.watch.add(sync_metrics.pop("comm_wait_s", 0.0))  # time blocked on the sync's collectives
            record.update(sync_metrics)
            self.skipped = 0
        else:
            self.plugin.discard()
            self.engine.discard()
            self.engine.take_comm_stats()
            self.skipped += 1
            self.skipped_total += 1
            record["lr"] = self.plugin.lr(step)
        dt = time.perf_counter() - t0
        sent = self.meter.take_step()
        record.update({
            "step_time_s": dt,
            "comm_wait_s": self.watch.take(),
            "wire_bytes": sum(v for k, v in sent.items() if k != "setup"),
            "control_bytes": sent.get("control", 0),
            "dense_bytes": accounting.dense_reference_bytes(self.engine.numel, self.world.world_size),
            f"{self.unit}_per_s": self.data.info.items_per_batch * self.world.world_size / max(dt, 1e-9),
            "skipped_steps": self.skipped_total,
        })
        return record

    def run(self) -> dict:
        t = self.cfg.trainer
        last = t.max_steps if t.stop_after is None else min(t.max_steps, t.stop_after)
        self.skipped, self.skipped_total = 0, 0
        bar = tqdm(total=t.max_steps, initial=self.start_step, disable=not (self.world.is_main and t.progress),
                   dynamic_ncols=True, mininterval=0.5)
        record: dict = {}
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
            if done % t.eval_every == 0 or done == t.max_steps:
                with self.sync.eval_model() as model:
                    record["val_loss"] = evaluate(model, self.data, self.world, self.meter)
                sent = self.meter.take_step()
                record["eval_bytes"] = sent.pop("eval", 0)  # evaluation traffic, never in wire_bytes
                record["wire_bytes"] += sum(v for k, v in sent.items() if k != "setup")
            self.log(record)
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.3f} | {record[f'{self.unit}_per_s']:.0f} {self.unit}/s "
                                f"| wire {record['wire_bytes'] / 1e6:.3f} MB/step", refresh=False)
            if done % t.checkpoint_every == 0 or done == last:
                self.save(done)
            self.faults.after_step(done)
        bar.close()
        return record

    def log(self, record: dict) -> None:
        if self.metrics is not None and (record["step"] % self.cfg.trainer.log_every == 0 or "val_loss" in record):
            self.metrics.log(record)
            self.logger.log(record, step=record["step"])

    def close(self) -> None:
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


def train(cfg: DictConfig, world: World) -> dict:
    os.makedirs(cfg.run_dir, exist_ok=True)
    check_config_agreement(cfg, world)
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
    return record
