"""The config groups and the schema of every option, built by walking the registries.

A group's schema for option ``o`` is the group-wide keys (valid for every option of the
group) plus the keys of ``o``'s own options (``thinwire.options``), with ``name`` (or, for
the ``_target_`` groups, ``_target_``) defaulting to the option. Registered with Hydra's
ConfigStore as ``<group>/base_<o>`` (named in the option's YAML, if it has one) and, for
options without a YAML (entry-point plugins), as ``<group>/<o>`` itself, so ``comm=myquant``
works from the command line with nothing but the plugin's class.

A part may preset group-wide keys for itself with a class attribute ``group_defaults``
(e.g. a lossy compressor: ``{"feedback": "ef", "min_numel": 1024}``), which an option YAML
would otherwise have to hold.

Group-wide keys, by group (everything else belongs to one option and fails with any other):

- ``comm``: ``name feedback warmup_steps min_numel collective seed`` plus the options of the
  error-feedback rules (``eta`` for ef21m/econtrol, ``init`` for ef21/ef21m), which must
  keep their defaults unless ``comm.feedback`` names a rule that has them;
- ``optim``: ``name lr weight_decay schedule warmup_steps min_lr_ratio decay_start``;
- ``peft``: ``name head_init head_init_batches``;
- ``sync``, ``engine``: ``name``;
- ``model``, ``data``, ``logger``: ``_target_`` (the builder; an option's default).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Callable

from .. import options as opts
from ..errors import ConfigError

# The parts are imported where a table needs them (``groups()``, the registries' entries), so
# that ``import thinwire.config`` does not load torch: downward imports, never a cycle
# (tests/test_import_graph.py).


@dataclass(frozen=True)
class Group:
    name: str
    base: type                                   # the group-wide keys
    entries: Callable[[], dict[str, object]]     # option name -> its part (class or builder)
    target: bool = False                         # options are built by hydra's instantiate(_target_)
    skip: tuple[str, ...] = ()                   # builder parameters that are group-wide

    def options(self) -> list[str]:
        return sorted(self.entries())

    def part(self, option: str):
        entries = self.entries()
        if option not in entries:
            raise ConfigError(f"{self.name}={option}: unknown option; valid: {', '.join(sorted(entries))}")
        return entries[option]

    def own(self, option: str) -> type:
        """The option's own keys (without the group-wide ones)."""
        return opts.options_of(self.part(option), self.skip)

    @functools.cache
    def schema(self, option: str) -> type:
        return self._schema(option, self.part(option))

    @functools.cache
    def builder_schema(self, path: str, builder) -> type:
        """The schema of a ``_target_`` group whose builder is a user's, named by ``path``
        (``thinwire.config.builders``): its signature's options, as for a registered one."""
        return self._schema(path.rsplit(".", 1)[-1], builder, target=path)

    def _schema(self, option: str, part, target: str | None = None) -> type:
        head = [("_target_", str, dataclasses.field(default=target or f"{part.__module__}.{part.__qualname__}"))] \
            if self.target else None
        return opts.schema_of(self.name, option, part, self.base, self.skip, head)


@dataclass
class NoGroupKeys:
    """The group-wide keys of the ``_target_`` groups: none besides ``_target_``."""


def _keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def schema_keys(schema: type) -> dict[str, type | None]:
    """Key -> nested schema (for dataclass-typed fields, e.g. ``trainer.faults``) or None."""
    try:
        types = typing.get_type_hints(schema)
    except Exception:
        types = {}
    out = {}
    for f in dataclasses.fields(schema):
        t = types.get(f.name, f.type)
        out[f.name] = t if isinstance(t, type) and dataclasses.is_dataclass(t) else None
    return out


# ---- the table -----------------------------------------------------------------------
def _comm_entries() -> dict:
    from ..comm.hooks import comm_parts

    return comm_parts()


def _models() -> dict:
    from ..models import MODELS
    return MODELS.entries()


def _datasets() -> dict:
    from ..data import DATASETS
    return DATASETS.entries()


def _loggers() -> dict:
    from ..trainer.loggers import LOGGERS
    return LOGGERS.entries()


_cached: tuple | None = None  # (groups, fixed groups) from thinwire.config.fast's snapshot, while it refuses


def use(table: tuple | None) -> None:
    """Serve ``groups()`` and ``fixed_groups()`` from a snapshot (``thinwire.config.fast``), or
    again from the registries (None)."""
    global _cached
    _cached = table


def loaded() -> bool:
    """The registries' table is built (its parts imported)."""
    return _groups.cache_info().currsize > 0


def groups() -> dict[str, Group]:
    return _cached[0] if _cached is not None else _groups()


@functools.cache
def _groups() -> dict[str, Group]:
    from ..comm.hooks import comm_base
    from ..comm.sync import SYNC_STRATEGIES, SyncConfig
    from ..optim.peft import PEFT_METHODS, PeftConfig
    from ..optim.plugins import OPTIMIZERS, OptimConfig
    from ..trainer.engine import ENGINES, EngineConfig

    table = [
        Group("model", NoGroupKeys, _models, target=True),
        Group("data", NoGroupKeys, _datasets, target=True),
        Group("comm", comm_base(), _comm_entries, skip=("seed",)),
        Group("sync", SyncConfig, SYNC_STRATEGIES.entries),
        Group("optim", OptimConfig, OPTIMIZERS.entries),
        Group("peft", PeftConfig, PEFT_METHODS.entries),
        Group("engine", EngineConfig, ENGINES.entries),
        Group("logger", NoGroupKeys, _loggers, target=True),
    ]
    return {g.name: g for g in table}


def fixed_groups() -> dict[str, type]:
    """Groups with one schema whatever the option (their YAMLs are presets of it)."""
    if _cached is not None:
        return _cached[1]
    from ..elastic.config import ElasticConfig
    from ..trainer.trainer_config import TrainerConfig
    from ..trainer.dist_config import DistConfig

    return {"trainer": TrainerConfig, "dist": DistConfig, "elastic": ElasticConfig}
