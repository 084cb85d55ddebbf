"""Compose and validate the run config, before any process or process group starts.

The console script composes with Hydra's Compose API (``version_base="1.3"``, no
chdir) rather than ``@hydra.main``, so that every config error becomes one line and
exit status 2. The composed config is resolved once; workers receive it as YAML and
never compose again, so all ranks run exactly the same config.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from .schema import register_schemas


class ConfigError(ValueError):
    """A user error in the config: reported as one line, exit status 2."""


def config_dir() -> str:
    """Where the YAML groups live: the repo's configs/, shipped as package thinwire.configs."""
    return str(resources.files("thinwire.configs"))


def _run_id() -> str:
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":  # torchrun gives all ranks of one job the same id
        return rid
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "-" + uuid.uuid4().hex[:6]


if not OmegaConf.has_resolver("thinwire_run_id"):
    OmegaConf.register_new_resolver("thinwire_run_id", _run_id, use_cache=True)


def one_line(msg: str) -> str:
    """Collapse a multi-line library message (Hydra, OmegaConf) into one line."""
    msg = re.sub(r"\s*\n\s*", " ", str(msg)).strip()
    return re.sub(r"\s{2,}", " ", msg)


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line overrides; resolve; drop ``hydra``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        run_dir = cfg.hydra.run.dir
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
        cfg.run_dir = str(run_dir)
        OmegaConf.resolve(cfg)
        OmegaConf.set_struct(cfg, True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from None
    return cfg


def from_yaml(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
