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

from ..errors import ConfigError, in_group, need
from ..options import option_keys
from .groups import fixed_groups, groups


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


def _run_checks(schema: type, base: type | None, own: type, values: dict) -> None:
    """The group-wide checks on every value of the option (they may need the option's own
    keys, e.g. comm's feedback/collective rules), then the option's own checks on its keys."""
    if base is not None and hasattr(base, "check"):
        base.check(schema(**values))
    if hasattr(own, "check"):
        own(**{k: values[k] for k in option_keys(own)}).check()


def check_group(cfg: DictConfig, group: str) -> None:
    g = groups()[group]
    option = chosen_option(cfg, group)
    if option is None:
        return
    values = OmegaConf.to_container(cfg[group], resolve=True)
    try:
        _run_checks(g.schema(option), g.base, g.own(option), values)
    except (ConfigError, ValueError) as e:
        raise in_group(group, e) from None


def validate(cfg: DictConfig) -> None:
    for name, schema in fixed_groups().items():
        try:
            _run_checks(schema, None, schema, OmegaConf.to_container(cfg[name], resolve=True))
        except (ConfigError, ValueError) as e:
            raise in_group(name, e) from None
    for group in groups():
        check_group(cfg, group)
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
    elif not getattr(plugin, "needs_grad_allreduce", True):  # it exchanges its own (compressed) state
        need(cfg.comm.name == "none", "comm", cfg.comm.name, f"optim={cfg.optim.name} compresses and exchanges "
             "its own momentum (no gradient all-reduce); use comm=none")
        need(strategy.needs_grad_allreduce, "sync", cfg.sync.name,
             f"optim={cfg.optim.name} synchronises every step itself; use sync=ddp")
    need("batch_size" in cfg.data, "data", cfg.data.get("_target_"), "a data set needs a batch_size option")
    for group in ("optim", "sync", "engine", "peft"):
        part = g[group].part(cfg[group].name)
        if hasattr(part, "check_run"):
            part.check_run(cfg)


def _check_resume(cfg: DictConfig) -> None:
    from ..trainer.checkpoint import check_loadable

    r = cfg.trainer.resume
    if r in ("none", "auto"):
        return
    need(os.path.isdir(r), "trainer.resume", r, "expected none, auto or a checkpoint directory")
    try:
        check_loadable(r)
    except ValueError as e:
        raise ConfigError(str(e)) from None
