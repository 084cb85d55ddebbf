"""Comparing two configs key by key: what the resume check (``thinwire.config.resume``) and the
comm hook's state check (``thinwire.comm.hooks``) report as one line. A bottom layer: it imports
nothing from thinwire but ``errors``, so every layer can use it."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

_UNSET = "<unset>"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def as_dict(cfg: DictConfig | Mapping | str) -> dict:
    """A config as a plain dict: a DictConfig, a mapping, or its YAML text."""
    if isinstance(cfg, str):
        cfg = OmegaConf.create(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def changes(saved: DictConfig | Mapping | str, current: DictConfig | Mapping | str,
            safe: Callable[[str], bool] = lambda key: False) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key not ``safe`` whose value differs
    (a key only one side has counts, shown as ``<unset>``), sorted by key. A group whose
    option changed (``comm.name``, ``model._target_``) is that one entry: the keys of two
    different options are not comparable."""
    a, b = flatten(as_dict(saved)), flatten(as_dict(current))
    switched = {k.rsplit(".", 1)[0] for k in set(a) | set(b)
                if k.count(".") == 1 and k.endswith((".name", "._target_")) and not _same(a.get(k), b.get(k))}
    out = []
    for key in sorted(set(a) | set(b)):
        if safe(key):
            continue
        group, _, rest = key.partition(".")
        if group in switched and rest not in ("name", "_target_"):
            continue
        old, new = a.get(key, _UNSET), b.get(key, _UNSET)
        if not _same(old, new):
            out.append((key, old, new))
    return out


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else OmegaConf.to_yaml(v).strip() if isinstance(v, (list, dict)) else repr(v)
    text = " ".join(str(text).split())
    return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``comm.name (topk -> int8), optim.lr (0.001 -> 0.002)``, at most ``limit`` keys."""
    shown = ", ".join(f"{k} ({_show(old)} -> {_show(new)})" for k, old, new in changes[:limit])
    more = len(changes) - limit
    return shown + (f" and {more} more" if more > 0 else "")
