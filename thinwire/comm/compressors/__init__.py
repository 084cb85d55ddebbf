"""Compressors: ``build_compressor(name, **kwargs)`` and the closed registry ``COMPRESSORS``.

Third parties add compressors through the entry-point group ``thinwire.compressors``
(each entry point names a :class:`Compressor` subclass); they are loaded lazily, the
first time ``build_compressor`` meets a name that is not built in.  Built-in names
cannot be overridden.
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points

from .base import Compressor, Payload, mix_seed
from .dense import BF16Compressor, FP16Compressor, NoneCompressor
from .quant import Dynamic8Compressor, Int8Compressor, Sign1Compressor, dynamic8_codebook
from .sparse import RandKCompressor, TernaryCompressor, TopKCompressor

ENTRY_POINT_GROUP = "thinwire.compressors"

COMPRESSORS: dict[str, type[Compressor]] = {
    c.name: c for c in (NoneCompressor, FP16Compressor, BF16Compressor, TopKCompressor,
                        RandKCompressor, Int8Compressor, Dynamic8Compressor,
                        Sign1Compressor, TernaryCompressor)
}


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in COMPRESSORS}


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under ``name`` (built in, or from an entry point)."""
    if name in COMPRESSORS:
        return COMPRESSORS[name]
    plugins = _plugins()
    if name not in plugins:
        valid = sorted(COMPRESSORS) + sorted(plugins)
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(valid)}")
    cls = plugins[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not a Compressor "
                         f"subclass: {cls!r}")
    return cls


def build_compressor(name: str, **kwargs) -> Compressor:
    """Build compressor ``name`` with its options.  Unknown name, unknown option or a
    bad value raise ``ValueError`` naming the compressor, key and value."""
    cls = compressor_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [k for k, p in params.items()
             if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        if key not in valid and not accepts_any:
            raise ValueError(f"{name}: unknown option {key}={value!r}; valid options: "
                             f"{', '.join(valid) or '(none)'}")
    return cls(**kwargs)


__all__ = ["COMPRESSORS", "ENTRY_POINT_GROUP", "Compressor", "Payload", "build_compressor",
           "compressor_class", "dynamic8_codebook", "mix_seed", "NoneCompressor",
           "FP16Compressor", "BF16Compressor", "TopKCompressor", "RandKCompressor",
           "TernaryCompressor", "Int8Compressor", "Dynamic8Compressor", "Sign1Compressor"]
