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
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Optional

from omegaconf import MISSING

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
