"""Refuse a bad config before importing torch (issue 36: a config error in under 3 s).

The registries that give every config group its options and schemas live next to the parts
(compressors, models, optimizers), in modules that import torch, which is most of a refusal's
time. After a full compose (``thinwire-train`` writes it), the schemas are kept on disk as
plain data, keyed by a fingerprint of thinwire's sources and of this Python, like a compiled
byte-code cache. :func:`refuse` then runs the *same* ``compose`` and ``validate`` over that
copy, with ``import torch`` refused: every part's option checks that live in a torch-free
module (``thinwire.models.gpt_options``, ``thinwire.trainer.fault_config``,
``thinwire.trainer.dist_config``, ``thinwire.elastic.config``) run as they are; the first
thing that needs a part's own code (a module that imports torch, an attribute of a part that
is not copied) stops this pass, and the full path decides. So the error it reports is the
one the full path reports first, in the same words; a config it cannot refuse costs the
full path plus this pass (~0.3 s).

Off (the full path only) with ``THINWIRE_CONFIG_CACHE=0``, when torch is already imported,
and while a package adds parts through a ``thinwire.*`` entry point (its code is not in the
fingerprint). Where: ``$THINWIRE_CACHE_DIR``, else ``$XDG_CACHE_HOME/thinwire``, else
``~/.cache/thinwire``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.abc
import json
import os
import sys
import types
import typing
from typing import Any, Optional

from ..errors import ConfigError

CACHED_ATTRS = ("needs_batches", "batches", "requires")  # part attributes compose and the first checks read
BLOCKED = ("torch",)
VERSION = 1


class NeedsParts(BaseException):
    """This pass needs a part's code (not an ``Exception``: no ``except Exception`` hides it)."""


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise NeedsParts(f"imports {name}")
        return None


# ---- where, and for which code -----------------------------------------------------------
def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("THINWIRE_CACHE_DIR") or os.path.join(base, "thinwire")


def enabled() -> bool:
    return os.environ.get("THINWIRE_CONFIG_CACHE", "1") != "0" and "torch" not in sys.modules


@functools.cache
def fingerprint() -> str:
    """thinwire's Python sources (path, size, mtime) and this interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(f"{VERSION}|{sys.version}|{sys.executable}|{root}".encode())
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{os.path.relpath(os.path.join(dirpath, f), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def path() -> str:
    return os.path.join(cache_dir(), f"config-schemas-{fingerprint()}.json")


def plugins_installed() -> bool:
    from importlib.metadata import entry_points

    return any(g.startswith("thinwire") for g in entry_points().groups)


# ---- the schemas as data ------------------------------------------------------------------
_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _enc_type(tp) -> Any:
    if tp is Any:
        return "Any"
    for name, t in _SCALARS.items():
        if tp is t:
            return name
    if tp in (list, dict, tuple):
        return {tp.__name__: []}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"union": [_enc_type(a) for a in args]}
    if origin in (list, dict, tuple):
        return {origin.__name__: [_enc_type(a) for a in args]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {"dataclass": _enc_class(tp)}
    raise TypeError(f"not cached: type {tp!r}")


def _enc_value(v) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return {type(v).__name__: [_enc_value(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _enc_value(x) for k, x in v.items()}}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"dc": {f.name: _enc_value(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    raise TypeError(f"not cached: value {v!r}")


def _where(obj) -> list[str] | None:
    """Module and qualified name of ``obj``, if they find ``obj`` again."""
    at = [getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)]
    try:
        return at if None not in at and _load(at) is obj else None
    except Exception:  # noqa: BLE001 - not found again: its check is left to the full path
        return None


def _enc_class(cls: type, check: dict | None = None) -> dict:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = {"value": _enc_value(f.default)}
        elif f.default_factory is not dataclasses.MISSING:
            default = {"value": _enc_value(f.default_factory())}
        else:
            default = {}
        fields.append([f.name, _enc_type(hints.get(f.name, f.type)), default])
    if check is None and callable(getattr(cls, "check", None)):
        check = {"how": "construct", "at": _where(cls)}
    return {"name": cls.__name__, "fields": fields, "allows_inf": list(getattr(cls, "allows_inf", ())),
            "check": check}


def _own_check(part, own: type) -> dict | None:
    """How the option's own check runs: its ``Config``'s ``check``, or the builder's ``check_options``."""
    if own is getattr(part, "Config", None):
        return None  # _enc_class: the class's own check
    if hasattr(part, "check_options"):
        return {"how": "check_options", "at": _where(part)}
    return {"how": "none"}


def snapshot() -> dict:
    """The registries' schemas, as built by ``groups`` and ``fixed_groups``."""
    from .groups import fixed_groups, groups

    out = {"fingerprint": fingerprint(), "groups": [], "fixed": []}
    for g in groups().values():
        base_check = {"how": "unbound", "at": _where(g.base)} if callable(getattr(g.base, "check", None)) else None
        entry = {"name": g.name, "target": g.target, "skip": list(g.skip), "base": _enc_class(g.base, base_check),
                 "options": []}
        for option, part in g.entries().items():
            own = g.own(option)
            entry["options"].append({
                "name": option, "schema": _enc_class(g.schema(option), {"how": "none"}),
                "own": _enc_class(own, _own_check(part, own)),
                "attrs": {a: _enc_value(getattr(part, a)) for a in CACHED_ATTRS if hasattr(part, a)}})
        out["groups"].append(entry)
    out["fixed"] = [{"name": name, "cls": _enc_class(cls)} for name, cls in fixed_groups().items()]
    return out


def remember() -> None:
    """Write the snapshot for this code, if it is not there (after a full compose)."""
    from .groups import loaded

    if not enabled_for_writing() or not loaded():
        return
    target = path()
    if os.path.exists(target):
        return
    try:
        text = json.dumps(snapshot())
    except TypeError:  # a schema this cache cannot hold: refusals keep the full path
        return
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
        for old in os.listdir(os.path.dirname(target)):  # other code's snapshots
            if old.startswith("config-schemas-") and old != os.path.basename(target):
                os.remove(os.path.join(os.path.dirname(target), old))
    except OSError:  # a read-only or full home: refusals keep the full path
        pass


def enabled_for_writing() -> bool:
    return os.environ.get("THINWIRE_CONFIG_CACHE", "1") != "0"


# ---- and back ------------------------------------------------------------------------------
def _load(at: list[str]):
    obj = importlib.import_module(at[0])
    for name in at[1].split("."):
        obj = getattr(obj, name)
    return obj


def _dec_type(t) -> Any:
    if isinstance(t, str):
        return Any if t == "Any" else _SCALARS[t]
    (kind, args), = t.items()
    if kind == "union":
        return typing.Union[tuple(_dec_type(a) for a in args)]
    if kind == "dataclass":
        return _dec_class(args)
    inner = tuple(_dec_type(a) for a in args)
    if not inner:
        return {"list": list, "dict": dict, "tuple": tuple}[kind]
    return {"list": typing.List, "dict": typing.Dict, "tuple": typing.Tuple}[kind][inner]


def _dec_value(v, tp=None) -> Any:
    if not isinstance(v, dict):
        return v
    (kind, x), = v.items()
    if kind == "dc":
        return tp(**{k: _dec_value(y, typing.get_type_hints(tp).get(k)) for k, y in x.items()})
    if kind == "dict":
        return {k: _dec_value(y) for k, y in x.items()}
    return {"list": list, "tuple": tuple}[kind](_dec_value(y) for y in x)


def _delegate(check: dict | None):
    """The check of a copied class: the part's own, imported (torch refused) and run."""
    how = (check or {}).get("how", "none")
    if how == "none":
        return None
    at = check.get("at")

    def run(self):
        if at is None:
            raise NeedsParts("a check that cannot be found again")
        real = _load(at)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if how == "construct":
            return real(**values).check()
        if how == "check_options":
            return real.check_options(self)
        return real.check(self)  # unbound: a group-wide check on the option's whole schema
    return run


def _dec_class(enc: dict) -> type:
    fields = []
    for name, t, default in enc["fields"]:
        tp = _dec_type(t)
        if "value" not in default:
            fields.append((name, tp))
            continue
        value = default["value"]
        if isinstance(value, dict):
            fields.append((name, tp, dataclasses.field(default_factory=lambda v=value, tp=tp: _dec_value(v, tp))))
        else:
            fields.append((name, tp, dataclasses.field(default=value)))
    namespace = {"allows_inf": tuple(enc["allows_inf"])} if enc["allows_inf"] else {}
    check = _delegate(enc["check"])
    if check is not None:
        namespace["check"] = check
    return dataclasses.make_dataclass(enc["name"], fields, namespace=namespace)


class Part:
    """A registered part as the config path sees it: the copied attributes, nothing else."""

    def __init__(self, option: str, attrs: dict):
        self._option, self._attrs = option, attrs

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in CACHED_ATTRS:
            raise NeedsParts(f"{self._option}.{name}")
        if name not in self._attrs:
            raise AttributeError(name)
        value = _dec_value(self._attrs[name])
        return tuple(value) if isinstance(value, list) else value


def table(data: dict):
    """``groups()`` and ``fixed_groups()`` from a snapshot."""
    from .groups import Group

    @dataclasses.dataclass(frozen=True, eq=False)
    class CachedGroup(Group):
        schemas: Optional[dict] = None
        owns: Optional[dict] = None

        def own(self, option: str) -> type:
            self.part(option)  # an unknown option: the same line
            return self.owns[option]

        def schema(self, option: str) -> type:
            self.part(option)
            return self.schemas[option]

    out = {}
    for g in data["groups"]:
        parts = {o["name"]: Part(o["name"], o["attrs"]) for o in g["options"]}
        out[g["name"]] = CachedGroup(g["name"], _dec_class(g["base"]), lambda parts=parts: dict(parts),
                                     target=g["target"], skip=tuple(g["skip"]),
                                     schemas={o["name"]: _dec_class(o["schema"]) for o in g["options"]},
                                     owns={o["name"]: _dec_class(o["own"]) for o in g["options"]})
    fixed = {f["name"]: _dec_class(f["cls"]) for f in data["fixed"]}
    return out, fixed


def load_table():
    if not enabled() or plugins_installed():
        return None
    try:
        with open(path()) as fh:
            data = json.load(fh)
        return table(data) if data.get("fingerprint") == fingerprint() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse(jobs: list[list[str]], loaded: tuple | None = None) -> None:
    """Raise the ``ConfigError`` that ``compose`` then ``validate`` raise first for ``jobs``,
    found without torch; return when this pass cannot tell (no snapshot for this code, a part's
    code needed) or finds no error, and the full path runs. ``loaded``: a ``table`` (tests)."""
    loaded = loaded or load_table()
    if loaded is None:
        return
    from . import groups as tables
    from .compose import compose
    from .rules import validate

    blocker = _NoTorch()
    sys.meta_path.insert(0, blocker)
    tables.use(loaded)
    try:
        cfgs = [compose(job) for job in jobs]
        for cfg in cfgs:
            validate(cfg)
    except ConfigError:
        raise
    except (NeedsParts, Exception):  # noqa: BLE001 - anything else: the full path decides
        return
    finally:
        tables.use(None)
        sys.meta_path.remove(blocker)
