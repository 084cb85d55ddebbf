"""Your own model, data set or logger: a ``_target_`` that names a builder in your package.

Two ways, both checked before any worker starts:

- on the command line, ``model._target_=mypkg.build_model`` (``data._target_=mypkg.MyData``):
  the group gets the builder's own options (its signature, as for a registered part), and
  ``model.<param>=...`` sets them; the options of the default model are dropped;
- a YAML in your package, ``hydra.searchpath=[pkg://mypkg.configs] model=mymodel``, whose
  ``_target_`` names the builder and which sets its options.

The builder's signature is its contract (``RUNTIME``): its positional-or-keyword parameters
are its options; the keyword-only arguments the trainer supplies at run time must be taken
as keyword-only (or through ``**kwargs``). A builder that cannot be imported or whose
signature lacks one of them is one line naming the ``_target_`` (exit status 2).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys

from ..errors import ConfigError

RUNTIME = {  # group -> keyword-only arguments the trainer passes to the builder
    "model": ("info",),
    "data": ("seed", "rank", "world_size"),
    "logger": ("run_dir", "run_config"),
}
CONTRACT = {
    "model": "def build(<options>, *, info) -> torch.nn.Module whose forward(**batch) returns the loss",
    "data": "class MyData: def __init__(self, batch_size, <options>, *, seed, rank, world_size)",
    "logger": "class MyLogger: def __init__(self, <options>, *, run_dir, run_config)",
}


def cwd_on_path() -> None:
    """Find a user's module in the current directory, as ``python -m`` would (the
    ``thinwire-train`` script's own directory is the venv's bin/); spawned workers inherit it."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def locate(group: str, path: str):
    """The object ``path`` names (``pkg.module.attr``), or a one-line ConfigError naming it."""
    key = f"{group}._target_={path}"
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path or ""):
        raise ConfigError(f"{key}: expected a dotted path to a builder, e.g. mypkg.build_model")
    cwd_on_path()
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ModuleNotFoundError as e:
        if e.name == parts[0]:
            raise ConfigError(f"{key}: cannot import {parts[0]} (not installed, not on PYTHONPATH, not in the "
                              f"current directory)") from None
        raise ConfigError(f"{key}: importing {parts[0]} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing: one line
        raise ConfigError(f"{key}: importing {parts[0]} failed: {e.__class__.__name__}: {e}") from None
    for i, name in enumerate(parts[1:], start=1):
        if hasattr(obj, name):
            obj = getattr(obj, name)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
            continue
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:i + 1]):
                raise ConfigError(f"{key}: importing {'.'.join(parts[:i + 1])} failed: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{key}: importing {'.'.join(parts[:i + 1])} failed: "
                              f"{e.__class__.__name__}: {e}") from None
        names = [n for n in dir(obj) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {'.'.join(parts[:i])}.{close[0]}?" if close else ""
        raise ConfigError(f"{key}: {'.'.join(parts[:i])} has no {name}{hint}")
    if not callable(obj):
        raise ConfigError(f"{key}: {path} is not a class or function")
    return obj


def check_signature(group: str, path: str, builder) -> None:
    """The builder takes the run-time arguments of its group as keyword-only arguments."""
    fn = builder.__init__ if isinstance(builder, type) else builder
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C extension: cannot be checked here
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    missing = [a for a in RUNTIME.get(group, ()) if a not in params or params[a].kind is not params[a].KEYWORD_ONLY]
    if missing:
        shown = ", ".join(str(p) for n, p in params.items() if n != "self")
        raise ConfigError(f"{group}._target_={path}: the builder must take {', '.join(missing)} as keyword-only "
                          f"argument(s), which the trainer passes; its signature is ({shown}); expected "
                          f"{CONTRACT[group]}")
    if group == "data" and "batch_size" not in params:
        raise ConfigError(f"{group}._target_={path}: a data set needs a batch_size option (per rank); "
                          f"expected {CONTRACT[group]}")


def user_builder(group: str, path: str):
    """Locate and check a user's ``_target_``; the builder."""
    builder = locate(group, path)
    check_signature(group, path, builder)
    return builder


def option_name(path: str) -> str:
    """The ConfigStore option under which a command-line ``_target_`` is registered."""
    return "target_" + path.replace(".", "_")
