"""The options of a pluggable part, declared next to the part.

Every pluggable part (compressor, error feedback, sync strategy, optimizer plugin, PEFT
method, engine, model, data set, logger) has *options*: a dataclass whose fields are the
keys a user may set for it and whose defaults are the part's defaults, written once. A part
gets its options in one of two ways:

- a nested ``Config`` dataclass (sync strategies, optimizer plugins, PEFT methods,
  engines, feedback rules): the part is built from a config node and reads ``cfg.<key>``;
- its builder's signature (compressors, models, data sets, loggers): the options are the
  positional-or-keyword parameters of ``__init__`` (or of the builder function) with
  their annotations and defaults; keyword-only parameters are supplied at run time
  (``seed``, ``rank``, ``info``, ``run_dir``) and are not options. This is the signature
  that ``hydra.utils.instantiate`` calls, so the schema cannot drift from the code.

An options dataclass may define ``check(self)`` (a builder: ``check_options(options)``), raising :class:`thinwire.errors.ConfigError`
(or ``ValueError``) with keys relative to the part (``ratio=2: ...``). ``thinwire.config``
assembles these per config group (adding the group-wide keys) and registers them with Hydra,
so entry-point plugins get option schemas of their own.

**One options path.** Every way in resolves a part's options through :func:`resolve` (or,
for the command line, whose keys and types Hydra has already enforced, through the same
:func:`check_finite` and :func:`run_checks`): the command line (``thinwire.config``),
``thinwire.OuterLoop``, ``comm_hook`` and entry-point plugins, so a bad value is refused
with the same one line (``comm.ratio=2.0: must be a number in (0, 1]``) whichever way it came.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Optional

import math
import re

from omegaconf import MISSING

from .errors import ConfigError, in_group

_SCALARS = (int, float, bool, str)


def _omegaconf_type(tp) -> Any:
    """``tp`` if OmegaConf can type a field with it, else ``Any``."""
    origin = typing.get_origin(tp)
    if tp in _SCALARS:
        return tp
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return Optional[args[0]]
        return Any
    if origin in (list, typing.List) and all(a in _SCALARS for a in typing.get_args(tp)):
        return tp
    return Any


def _default(value):
    if value is inspect.Parameter.empty:
        return dataclasses.field(default=MISSING)
    if isinstance(value, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda v=value: type(value)(v) if not isinstance(value, tuple) else list(v))
    return dataclasses.field(default=value)


def signature_options(builder, skip: tuple[str, ...] = ()) -> type:
    """The options dataclass of ``builder`` (a class: its ``__init__``; or a function):
    its positional-or-keyword parameters except ``self`` and ``skip``."""
    fn = builder.__init__ if isinstance(builder, type) else builder
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an unresolvable annotation (e.g. a return type): fall back to Any
        hints = {}
    fields = []
    for name, p in inspect.signature(fn).parameters.items():
        if name == "self" or name in skip or p.kind is not p.POSITIONAL_OR_KEYWORD:
            continue
        fields.append((name, _omegaconf_type(hints.get(name, Any)), _default(p.default)))
    namespace = {}
    if hasattr(builder, "check_options"):  # the builder checks its own options
        namespace["check"] = lambda self: builder.check_options(self)
    return dataclasses.make_dataclass(f"{getattr(builder, '__name__', 'Builder')}Options", fields,
                                      namespace=namespace)


def options_of(part, skip: tuple[str, ...] = ()) -> type:
    """The options dataclass of a registered part: its ``Config``, else its signature's."""
    own = getattr(part, "Config", None)
    if own is not None and dataclasses.is_dataclass(own):
        return own
    return signature_options(part, skip)


def option_keys(options: type) -> list[str]:
    return [f.name for f in dataclasses.fields(options)]


def defaults(options: type) -> dict:
    """Field -> default value (``MISSING`` when required)."""
    out = {}
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = MISSING
    return out


# ---- the one resolver ------------------------------------------------------------------
FLOAT32_MAX = 3.4028234663852886e38


def schema_of(group: str, option: str, part, base: type, skip: tuple[str, ...] = (), head: list | None = None) -> type:
    """The schema of ``option`` in ``group``: the part's own options (:func:`options_of`)
    plus the group-wide keys of ``base``, with the part's ``group_defaults`` presets of them.
    ``head``: fields that come first (``name`` or ``_target_``: ``thinwire.config.groups``)."""
    own = options_of(part, skip)
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    clash = [k for k in option_keys(own) if k in base_fields]
    if clash:
        raise TypeError(f"{group}={option}: own option(s) {', '.join(clash)} clash with the "
                        f"group-wide keys of {group}")
    head = list(head if head is not None else [("name", str, dataclasses.field(default=option))])
    for key, value in getattr(part, "group_defaults", {}).items():  # the option's presets of group-wide keys
        if key not in base_fields:
            raise TypeError(f"{group}={option}: group_defaults key {key!r} is not group-wide in {group}")
        head.append((key, base_fields[key].type, dataclasses.field(default=value)))
    cls_name = "".join(w.capitalize() for w in f"{option}_{group}".split("_")) + "Config"
    return dataclasses.make_dataclass(cls_name, head, bases=(own, base))


def _flatten(values, prefix: str):
    if isinstance(values, dict):
        for k, v in values.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, values


def check_finite(values: dict, prefix: str = "", allows_inf: set[str] | frozenset = frozenset()) -> None:
    """Every float option is a finite number that float32 can hold (``optim.lr=1e300`` would
    be inf there), except the keys (full dotted names) an option declares as taking inf for
    "off" (its options' ``allows_inf``, e.g. ``sync.clip=.inf``: no clipping)."""
    for key, value in _flatten(values, prefix):
        if not isinstance(value, float) or (math.isinf(value) and key in allows_inf):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number")
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{key}={value}: must be a finite number (at most {FLOAT32_MAX:.3g} in "
                              f"magnitude: it is used in float32, where it would be inf)")


def allows_inf(group: str, own: type) -> set[str]:
    return {f"{group}.{k}" for k in getattr(own, "allows_inf", ())}


def run_checks(group: str, schema: type, base: type | None, own: type, values: dict) -> None:
    """The group-wide checks on every value of the option (they may need the option's own
    keys, e.g. comm's feedback/collective rules), then the option's own checks on its keys;
    a failure is one ConfigError keyed in ``group`` (``comm.ratio=2.0: ...``)."""
    try:
        if base is not None and hasattr(base, "check"):
            base.check(schema(**values))
        if hasattr(own, "check"):
            own(**{k: values[k] for k in option_keys(own)}).check()
    except (ConfigError, ValueError) as e:
        raise in_group(group, e) from None


def typed(group: str, schema: type, values: dict) -> dict:
    """``values`` over the schema's defaults, converted to the schema's types as the command
    line's are (``ratio=2`` -> 2.0); a value of the wrong type is one line, as Hydra says it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = OmegaConf.structured(schema)
    for key, value in values.items():
        try:
            node[key] = value
        except OmegaConfBaseException as e:
            msg = re.sub(r"\s+", " ", str(e).splitlines()[0]).strip()
            raise ConfigError(f"{group}.{key}={value}: {msg}") from None
    return OmegaConf.to_container(node, resolve=True)


def resolve(group: str, option: str, part, values: dict, *, base: type, skip: tuple[str, ...] = (),
            head: list | None = None) -> dict:
    """The options of ``option`` (``part``: its class or builder) in ``group`` from a
    library caller's ``values``: every key of the schema, defaults filled in, typed,
    finite, and checked by the part and by the group (the checks the command line runs).
    An unknown key is one line naming the valid ones."""
    schema = schema_of(group, option, part, base, skip, head)
    valid = option_keys(schema)
    for key in values:
        if key not in valid:
            raise ConfigError(f"{group}={option}: unknown option {key!r}; valid: {', '.join(sorted(valid))}")
    out = typed(group, schema, values)
    own = options_of(part, skip)
    check_finite(out, group, allows_inf(group, own))
    run_checks(group, schema, base, own, out)
    return out
