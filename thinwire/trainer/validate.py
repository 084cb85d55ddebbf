"""Semantic checks of a composed config, run before any process or process group starts.

Types and unknown keys are caught by the schemas at compose time; this module checks
ranges, registry names, combinations and files. Each failure is a ``ConfigError`` whose
message names the key and the value, printed as one line with exit status 2.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from ..comm.aggregator import check_combination
from ..comm.hooks import comm_names
from ..comm.sync import SYNC_STRATEGIES
from ..optim.peft import PEFT_METHODS
from ..optim.plugins import OPTIMIZERS, check_plugin_config
from .checkpoint import check_loadable
from .config import ConfigError
from .engine import ENGINES

FEEDBACKS = ("none", "ef", "ef21", "ef21m", "econtrol")
COLLECTIVES = ("auto", "allreduce", "allgather", "two_phase")


def _need(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value}: {why}")


def _positive(cfg, group: str, *keys: str) -> None:
    for k in keys:
        v = cfg[group][k]
        _need(v is not None and v > 0, f"{group}.{k}", v, "must be positive")


def _in(value, options, key: str) -> None:
    _need(value in options, key, value, f"expected one of {', '.join(map(str, options))}")


def _registry(reg, name: str, key: str) -> None:
    try:
        reg.get(name, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: DictConfig) -> None:
    t = cfg.trainer
    _positive(cfg, "trainer", "max_steps", "eval_every", "checkpoint_every", "log_every")
    _need(t.stop_after is None or t.stop_after > 0, "trainer.stop_after", t.stop_after, "must be positive or null")
    _need(t.max_skipped_steps >= 0, "trainer.max_skipped_steps", t.max_skipped_steps, "must be >= 0")
    _need(t.sample_chars >= 0, "trainer.sample_chars", t.sample_chars, "must be >= 0")
    _need(t.keep_checkpoints >= 0, "trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0 = keep all)")
    _need(t.resume in ("none", "auto") or os.sep in t.resume or os.path.exists(t.resume), "trainer.resume",
          t.resume, "expected none, auto or a checkpoint directory")
    f = t.faults
    _need(0 <= f.rank < 1_000_000, "trainer.faults.rank", f.rank, "must be >= 0")
    for k in ("nan_at", "kill_at", "stop_at"):
        _need(f[k] is None or f[k] > 0, f"trainer.faults.{k}", f[k], "must be a positive step or null")

    d = cfg.dist
    _need(d.nproc >= 1, "dist.nproc", d.nproc, "must be >= 1")
    _need(d.threads >= 0, "dist.threads", d.threads, "must be >= 0 (0 = cores / local workers)")
    _in(d.backend, ("auto", "gloo", "nccl"), "dist.backend")
    _positive(cfg, "dist", "timeout_s")
    _need(d.max_restarts >= 0, "dist.max_restarts", d.max_restarts, "must be >= 0")
    if d.backend == "nccl":
        import torch

        _need(torch.cuda.is_available(), "dist.backend", d.backend, "needs CUDA, which is not available")

    _positive(cfg, "data", "batch_size")
    if "eval_batches" in cfg.data:
        _positive(cfg, "data", "eval_batches")
    if "val_fraction" in cfg.data:
        _need(0 < cfg.data.val_fraction < 1, "data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    _check_model(cfg)
    _check_data(cfg)

    o = cfg.optim
    _registry(OPTIMIZERS, o.name, "optim")
    _positive(cfg, "optim", "lr")
    _need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _need(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _in(o.schedule, ("constant", "cosine"), "optim.schedule")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
          "must be two numbers in [0, 1)")

    c = cfg.comm
    _need(c.name in comm_names(), "comm", c.name, f"unknown; valid: {', '.join(comm_names())}")
    _in(c.feedback, FEEDBACKS, "comm.feedback")
    _need(c.name != "none" or c.feedback == "none", "comm.feedback", c.feedback,
          "needs a compressor (comm=none sends exact gradients)")
    _need(0 < c.ratio <= 1, "comm.ratio", c.ratio, "must be in (0, 1]")
    _need(0 <= c.eta <= 1, "comm.eta", c.eta, "must be in [0, 1]")
    _positive(cfg, "comm", "block_size")
    _need(c.warmup_steps >= 0, "comm.warmup_steps", c.warmup_steps, "must be >= 0")
    _need(c.min_numel >= 0, "comm.min_numel", c.min_numel, "must be >= 0")
    _in(c.collective, COLLECTIVES, "comm.collective")
    _in(c.init, ("dense", "zero"), "comm.init")
    if c.name != "none":
        try:
            check_combination(c.name, OmegaConf.to_container(c, resolve=True))
        except ValueError as e:
            raise ConfigError(_comm_error(str(e))) from None

    s = cfg.sync
    _registry(SYNC_STRATEGIES, s.name, "sync")
    _need(s.local_steps >= 1, "sync.local_steps", s.local_steps, "must be >= 1")
    _need(s.outer_lr > 0, "sync.outer_lr", s.outer_lr, "must be positive")
    _need(0 <= s.outer_momentum < 1, "sync.outer_momentum", s.outer_momentum, "must be in [0, 1)")
    _need(not s.nesterov or s.outer_momentum > 0, "sync.nesterov", s.nesterov,
          "Nesterov needs sync.outer_momentum > 0")
    _need(s.clip > 0, "sync.clip", s.clip, "must be positive (outer-momentum clipping threshold)")
    _in(s.clip_mode, ("norm", "value"), "sync.clip_mode")
    _need(s.staleness_penalty >= 0, "sync.staleness_penalty", s.staleness_penalty, "must be >= 0 (0 = off)")

    _registry(ENGINES, cfg.engine.name, "engine")
    _positive(cfg, "engine", "bucket_cap_mb")
    _check_engine(cfg)
    _registry(PEFT_METHODS, cfg.peft.name, "peft")
    check_plugin_config(cfg)  # zo_* and peft adapter fields (thinwire.optim)
    if "mode" in cfg.logger:
        _in(cfg.logger.mode, ("offline", "online", "disabled"), "logger.mode")

    _check_resume(cfg)


def _check_engine(cfg: DictConfig) -> None:
    """engine=deepspeed: the combinations it supports (thinwire.trainer.deepspeed_engine)."""
    if cfg.engine.name == "deepspeed":
        from .deepspeed_engine import check_config

        check_config(cfg)


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    target = m.get("_target_", "")
    if target.endswith("build_gpt"):
        _positive(cfg, "model", "n_layer", "n_head", "n_embd", "block_size")
        _need(m.n_embd % m.n_head == 0, "model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
        _need(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if "path" in m:
        from ..models.hf import resolve_model_path

        try:
            resolve_model_path(m.path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if "hidden" in m:
        _positive(cfg, "model", "hidden")
        _in(m.arch, ("mlp", "cnn"), "model.arch")


def _check_data(cfg: DictConfig) -> None:
    target = cfg.data.get("_target_", "")
    try:
        if target.endswith("ShakespeareChars") or target.endswith("ShakespeareLines"):
            from ..data.shakespeare import load_texts

            texts = load_texts()
            if target.endswith("ShakespeareChars"):
                val_len = sum(len(x) - int(len(x) * (1 - cfg.data.val_fraction)) for x in texts.values())
                _need(cfg.data.block_size + 1 < val_len, "model.block_size", cfg.data.block_size,
                      f"is larger than the validation text ({val_len} chars)")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def _check_resume(cfg: DictConfig) -> None:
    r = cfg.trainer.resume
    if r in ("none", "auto"):
        return
    _need(os.path.isdir(r), "trainer.resume", r, "expected none, auto or a checkpoint directory")
    try:
        check_loadable(r)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _comm_error(msg: str) -> str:
    """Compressor errors say ``<name>: key=value ...``; name the config key instead."""
    import re

    if msg.startswith("comm."):
        return msg
    m = re.match(r"^\w+: (\w+)=", msg)
    return f"comm.{msg.split(': ', 1)[1]}" if m else f"comm: {msg}"
