"""Compose the run config with Hydra's Compose API and enforce the key rules.

The console script composes with Hydra's Compose API (``version_base="1.3"``, no chdir)
rather than ``@hydra.main``, so that every config error becomes one line and exit status 2.
The composed config is resolved once; workers receive it as YAML and never compose again,
so all ranks run exactly the same config.

Key rules (a key is ``<group>.<key>``; the group's chosen option fixes its keys):

- ``comm.ratio=0.1``: sets a key of the chosen option, or a group-wide key. A key the option
  does not have fails with one line naming key and option (``comm.ratio: not an option of
  comm=int8``), a "did you mean" for near misses and the options that do have it.
- ``++comm.ratio=0.1``: the *where it exists* form, for sweeps over options with different
  keys (``--multirun comm=topk,int8 ++comm.ratio=0.1``): set where the chosen option has the
  key, ignored where it does not. A key that no option of the group has still fails.
- ``+comm.foo=1`` is rejected: options have fixed keys, so adding one cannot be meant.
  ``+engine.deepspeed.x=1`` / ``+sync.outer_optim.weight_decay=0.1`` add to an open dict
  (a library's own config, an optimizer's keyword arguments); a ``+`` key inside a typed
  sub-config (``trainer.faults``) still fails as not an option.
- ``~comm`` and ``~comm.ratio`` are rejected: every run needs one option per group, and
  every option needs all of its keys.
- ``comm.name=int8`` is rejected: the option is chosen with ``comm=int8`` (which also
  selects its schema).
"""
from __future__ import annotations

import difflib
import os
import re
import time
import uuid

from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import ConfigError, one_line
from .groups import fixed_groups, groups, schema_keys
from .schema import config_dir, register_schemas


def _run_id() -> str:
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":  # torchrun gives all ranks of one job the same id
        return rid
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "-" + uuid.uuid4().hex[:6]


if not OmegaConf.has_resolver("thinwire_run_id"):
    OmegaConf.register_new_resolver("thinwire_run_id", _run_id, use_cache=True)


def _typed_groups() -> set[str]:
    return set(groups()) | set(fixed_groups())


def _rewrite(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Hydra overrides with every plain ``<group>.<key>=v`` turned into ``++`` (so a key the
    option lacks reaches our check instead of Hydra's message), and how each key was set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    typed, out, how = _typed_groups(), [], {}
    extra = _search_dirs(parsed)
    for o in parsed:
        key = o.key_or_group
        head = key.split(".")[0].split("/")[0]
        if head not in typed and head not in PRESET_GROUPS and head != "hydra" and not o.package:
            raise _unknown_top(key, typed)
        if head not in typed or o.package:
            if head in PRESET_GROUPS and key == head and not o.is_delete():
                value = o.value()
                valid = _choices(head, extra)
                if isinstance(value, str) and value not in valid:
                    raise ConfigError(f"{key}={value}: unknown preset; valid: {', '.join(valid)}")
            out.append(o.input_line)
            continue
        if o.is_delete():
            what = "every option needs all of its keys; set a value instead" if "." in key else \
                f"every run needs a {head} option; choose one with {head}=<name>"
            raise ConfigError(f"~{key}: cannot be deleted: {what}")
        if "." not in key:
            value = o.value()
            if head in groups() and isinstance(value, str) and value not in _choices(head, extra):
                raise ConfigError(f"{key}={value}: unknown option; valid: {', '.join(_choices(head, extra))}")
            out.append(o.input_line)
            continue
        if key == f"{head}._target_" and head in groups() and groups()[head].target and not o.is_add() \
                and isinstance(o.value(), str):
            out.append(_target_choice(head, o.value()))
            continue
        if key.count(".") == 1 and key.endswith(".name") and head in groups() and not groups()[head].target:
            raise ConfigError(f"{key}={o.value()}: choose the option with {head}={o.value()}, not {key}")
        if o.is_force_add():
            how[key] = "where_exists"
            out.append(o.input_line)
        elif o.is_add() and key.count(".") >= 2:
            out.append(o.input_line)  # into an open dict (engine.deepspeed, sync.outer_optim): checked after
        elif o.is_add():
            raise ConfigError(f"+{key}: options have fixed keys, so one cannot be added; set an existing key "
                              f"with {key}=..., or use ++{key}=... to set it where the chosen option has it")
        else:
            how[key] = "plain"
            out.append("++" + o.input_line)
    return out, how


def _unknown_top(key: str, typed: set[str]) -> ConfigError:
    """A key outside every group (``trainr.max_steps``, ``max_steps``): never added silently
    (Hydra would suggest ``+key``, which runs with the typo ignored); a near group, or the
    groups that have such a key, as "did you mean"."""
    head, _, rest = key.partition(".")
    close = difflib.get_close_matches(head, sorted(typed | set(PRESET_GROUPS)), n=1)
    if close and rest:
        hint = f"; did you mean {close[0]}.{rest}?"
    else:
        leaf = key.rsplit(".", 1)[-1]
        homes = sorted(g for g in typed if any(leaf in _all_keys(g, o) for o in _options_of(g)))
        hint = f"; did you mean {' or '.join(f'{g}.{leaf}' for g in homes)}?" if homes else \
            (f"; did you mean {close[0]}?" if close else "")
    return ConfigError(f"{key}: not a key of the config (groups: {', '.join(sorted(typed))}){hint}")


def _options_of(group: str) -> list[str | None]:
    return groups()[group].options() if group in groups() else [None]


def _all_keys(group: str, option: str | None) -> dict:
    return schema_keys(groups()[group].schema(option) if option else fixed_groups()[group])


def _target_choice(group: str, path: str) -> str:
    """``model._target_=mypkg.build_model`` as a choice of the group: a registered builder's
    option, or the user's builder registered (as ``target_<path>``) with its own options, so
    the default option's keys do not follow it (``thinwire.config.builders``)."""
    from hydra.core.config_store import ConfigStore

    from .builders import option_name, user_builder

    g = groups()[group]
    builder = user_builder(group, path)
    for option, part in g.entries().items():
        if part is builder:
            return f"{group}={option}"
    name = option_name(path)
    ConfigStore.instance().store(group=group, name=name, node=g.builder_schema(path, builder))
    return f"{group}={name}"


PRESET_GROUPS = ("experiment",)  # groups of YAML presets only (no schema of their own)


def _choices(group: str, extra: tuple[str, ...] = ()) -> list[str]:
    """What ``<group>=`` accepts: registered options and the YAML presets in configs/ and in
    the ``hydra.searchpath`` directories (``extra``: a user's package of configs)."""
    yamls = []
    for root in (config_dir(), *extra):
        d = os.path.join(root, group)
        yamls += [f[:-5] for f in os.listdir(d) if f.endswith(".yaml")] if os.path.isdir(d) else []
    return sorted(set(groups()[group].entries() if group in groups() else ()) | set(yamls))


def _search_dirs(parsed) -> tuple[str, ...]:
    """The directories of ``hydra.searchpath=[pkg://mypkg.configs, file:///abs/dir, dir]``."""
    from importlib import resources

    from .builders import cwd_on_path

    cwd_on_path()
    out = []
    for o in parsed:
        if o.key_or_group != "hydra.searchpath" or o.is_delete():
            continue
        value = o.value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if entry.startswith("pkg://"):
                try:
                    out.append(str(resources.files(entry[len("pkg://"):])))
                except (ModuleNotFoundError, TypeError) as e:
                    raise ConfigError(f"hydra.searchpath={entry}: cannot import {entry[len('pkg://'):]} "
                                      f"({e})") from None
            else:
                out.append(entry[len("file://"):] if entry.startswith("file://") else entry)
    return tuple(out)


def _who_has(group: str, key: str) -> list[str]:
    g = groups()[group]
    return [o for o in g.options() if key in schema_keys(g.schema(o))]


def _not_an_option(group: str, option: str, path: str, allowed: list[str]) -> ConfigError:
    key = path.split(".")[-1]
    where = f"{group}.{option}" if option.startswith("_target_=") else f"{group}={option}"
    msg = f"{path}: not an option of {where}" if option else f"{path}: not an option of {group}"
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        msg += f"; did you mean {path.rsplit('.', 1)[0]}.{close[0]}?"
    elif group in groups() and path.count(".") == 1:  # a key of another option (comm.ratoi under comm=none)
        every = sorted({k for o in groups()[group].options() for k in schema_keys(groups()[group].schema(o))})
        near = difflib.get_close_matches(key, every, n=1)
        if near and near[0] != key:
            others = _who_has(group, near[0])
            return ConfigError(f"{msg}; did you mean {group}.{near[0]}? (an option of {group}={', '.join(others)}: "
                               f"choose one, e.g. {group}={others[0]} {group}.{near[0]}=...)")
    if group in groups() and path.count(".") == 1:
        others = _who_has(group, key)
        if others:
            msg += f" ({', '.join(others)} {'has' if len(others) == 1 else 'have'} it; " \
                   f"++{path}=... sets it only where it exists)"
    return ConfigError(msg)


def _enforce_keys(node: DictConfig, schema: type, group: str, option: str, prefix: str,
                  how: dict[str, str]) -> None:
    """Drop ``++`` keys the option lacks; fail on any other key it lacks."""
    keys = schema_keys(schema)
    for key in list(node.keys()):
        path = f"{prefix}.{key}"
        if key not in keys:
            if how.get(path) == "where_exists" and group in groups() and _who_has(group, key):
                with open_dict(node):
                    del node[key]
                continue
            raise _not_an_option(group, option, path, list(keys))
        if keys[key] is not None and isinstance(node[key], DictConfig):
            _enforce_keys(node[key], keys[key], group, option, path, how)


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line overrides; enforce the key rules;
    resolve; drop ``hydra``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .rules import check_model_data

    register_schemas()
    rewritten, how = _rewrite(overrides)
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=rewritten, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        run_dir = cfg.hydra.run.dir
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
        cfg.run_dir = str(run_dir)
        OmegaConf.set_struct(cfg, True)
        for name, group in groups().items():
            option = _option(cfg, group, choices.get(name))
            if option is not None:
                _enforce_keys(cfg[name], group.schema(option), name, option, name, how)
            elif group.target:  # a user's own builder: its signature's options, typed
                _user_target(cfg, group, how)
        for name, schema in fixed_groups().items():
            _enforce_keys(cfg[name], schema, name, "", name, how)
        check_model_data(cfg)  # before data's interpolations of model keys (model.path) resolve
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, how)) from None
    return cfg


def _user_target(cfg: DictConfig, group, how: dict[str, str]) -> None:
    """The node of a ``_target_`` group whose builder is the user's: importable, with the
    run-time arguments in its signature, only keys it takes, of its types, none missing."""
    from .builders import user_builder

    path = cfg[group.name].get("_target_")
    schema = group.builder_schema(path, user_builder(group.name, path))
    _enforce_keys(cfg[group.name], schema, group.name, f"_target_={path}", group.name, how)
    given = OmegaConf.to_container(cfg[group.name], resolve=False)  # interpolations of other groups kept
    with open_dict(cfg):
        cfg[group.name] = OmegaConf.structured(schema)
    cfg[group.name].merge_with(given)
    missing = sorted(OmegaConf.missing_keys(cfg[group.name]))
    if missing:
        key = missing[0] if missing[0].startswith(f"{group.name}.") else f"{group.name}.{missing[0]}"
        raise ConfigError(f"{key}: required by {path} (it has no default); set {key}=...")


def _explain(e: Exception, how: dict[str, str]) -> str:
    """Hydra's message, with the reason of a failed override (a wrong type: OmegaConf's
    ValidationError, chained below Hydra's) and the override as the user wrote it."""
    msg = one_line(e)
    m = re.match(r"Error merging override (\+\+)?([\w.]+)=(.*)$", msg)
    if not m:
        return msg
    from omegaconf.errors import ValidationError

    cause = e
    while (cause.__cause__ or cause.__context__) and not isinstance(cause, ValidationError):
        cause = cause.__cause__ or cause.__context__
    reason = one_line(cause).split(" full_key:")[0] if cause is not e else "cannot be set"
    key = m.group(2) if how.get(m.group(2)) == "plain" or not m.group(1) else f"++{m.group(2)}"
    return f"{key}={m.group(3)}: {reason}"


def _option(cfg: DictConfig, group, choice: str | None) -> str | None:
    """The registered option whose schema ``cfg[group]`` must match. A YAML may be a preset
    of a registered option (``sync=diloco`` is ``name: local`` with DiLoCo's outer recipe);
    a ``_target_`` group with a user's own builder has none (its keys are the builder's)."""
    from .rules import chosen_option

    option = chosen_option(cfg, group.name)
    if not group.target and option not in group.entries():
        raise ConfigError(f"{group.name}.name={option}: unknown option; valid: {', '.join(group.options())}")
    if not group.target and option != choice:  # a preset: its node must be the named option's
        missing = set(schema_keys(group.schema(option))) - set(cfg[group.name].keys())
        if missing:
            raise ConfigError(f"{group.name}={choice}: its name={option} does not match its schema "
                              f"(no {', '.join(sorted(missing))}); name its base base_{option}")
    return option


def from_yaml(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
