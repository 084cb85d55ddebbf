"""Register every schema with Hydra's ConfigStore (see ``groups``): the root ``base_train``,
``<group>/base_<option>`` for every option of every group, and ``<group>/<option>`` for the
options that have no YAML in ``configs/`` (so an entry-point plugin needs none)."""
from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import Any

from omegaconf import MISSING

from .groups import fixed_groups, groups


def config_dir() -> str:
    """Where the YAML groups live: the repo's configs/, shipped as package thinwire.configs."""
    return str(resources.files("thinwire.configs"))


def has_yaml(group: str, option: str) -> bool:
    return os.path.exists(os.path.join(config_dir(), group, f"{option}.yaml"))


def root_schema() -> type:
    """The run config: one field per group (pluggable groups typed by their chosen option's
    schema when composed), plus ``run_dir`` (= hydra.run.dir, resolved once for all ranks)."""
    fields = [(g, Any, dataclasses.field(default=MISSING)) for g in groups()]
    fields += [(g, cls, dataclasses.field(default_factory=cls)) for g, cls in fixed_groups().items()]
    fields.append(("run_dir", str, dataclasses.field(default=MISSING)))
    return dataclasses.make_dataclass("TrainConfig", fields)


def register_schemas() -> None:
    """(Re-)register all schemas: cheap, and picks up parts registered since the last call."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_train", node=root_schema())
    for g in groups().values():
        for option in g.options():
            schema = g.schema(option)
            cs.store(group=g.name, name=f"base_{option}", node=schema)
            if not has_yaml(g.name, option):
                cs.store(group=g.name, name=option, node=schema)
    for name, cls in fixed_groups().items():
        cs.store(group=name, name=f"base_{name}", node=cls)
