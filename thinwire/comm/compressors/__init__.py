"""Compressors: ``build_compressor(name, **kwargs)`` and the closed registry ``COMPRESSORS``.

Third parties add compressors through the entry-point group ``thinwire.compressors``
(each entry point names a :class:`Compressor` subclass); they are loaded lazily, the
first time ``build_compressor`` meets a name that is not built in.  Built-in names
cannot be overridden.  A compressor's options are its ``__init__``'s parameters: their
defaults are the config's defaults and ``__init__`` checks them (``thinwire.options``).
"""
from __future__ import annotations

from .base import Compressor, Payload, mix_seed
from .chunked import ChunkTopKCompressor
from .dense import BF16Compressor, FP16Compressor, NoneCompressor
from .quant import Dynamic8Compressor, Int8Compressor, Sign1Compressor, dynamic8_codebook
from .sparse import RandKCompressor, TernaryCompressor, TopKCompressor

from ...errors import ConfigError
from ...options import check_finite, option_keys, options_of
from ...registry import Registry

ENTRY_POINT_GROUP = "thinwire.compressors"

COMPRESSORS: Registry[type[Compressor]] = Registry("comm", ENTRY_POINT_GROUP)
for _cls in (NoneCompressor, FP16Compressor, BF16Compressor, TopKCompressor, RandKCompressor,
             Int8Compressor, Dynamic8Compressor, Sign1Compressor, TernaryCompressor, ChunkTopKCompressor):
    COMPRESSORS.register(_cls.name)(_cls)
# issue 34: low-bit pseudo-gradient quantisers (lowbit.py)
from .lowbit import FP8Compressor, Int4Compressor  # noqa: E402
for _cls in (FP8Compressor, Int4Compressor):
    COMPRESSORS.register(_cls.name)(_cls)


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under ``name`` (built in, or from an entry point)."""
    try:
        cls = COMPRESSORS.get(name, "comm")
    except ValueError:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(COMPRESSORS.names())}") from None
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not a Compressor "
                         f"subclass: {cls!r}")
    return cls


def compressor_options(name: str) -> list[str]:
    """The option names of compressor ``name``: its ``__init__``'s parameters (with seed)."""
    return option_keys(options_of(compressor_class(name)))


def build_compressor(name: str, **kwargs) -> Compressor:
    """Build compressor ``name`` with its options.  Unknown name, unknown option or a
    bad value raise ``ValueError`` naming the compressor, key and value: the message of
    ``thinwire.options.resolve`` (the command line's, ``comm_hook``'s), headed by the
    compressor's name instead of the ``comm.`` group (``topk: ratio=inf: must be a finite
    number``; ``thinwire.errors.in_group("comm", e)`` turns it into the command line's)."""
    cls = compressor_class(name)
    valid = compressor_options(name)
    for key, value in kwargs.items():
        if key not in valid:
            raise ValueError(f"{name}: unknown option {key}={value!r}; valid options: "
                             f"{', '.join(valid) or '(none)'}")
    try:
        check_finite(kwargs, "", set(getattr(options_of(cls), "allows_inf", ())))
    except ConfigError as e:
        raise ValueError(f"{name}: {e}") from None
    return cls(**kwargs)


__all__ = ["COMPRESSORS", "ENTRY_POINT_GROUP", "Compressor", "Payload", "build_compressor",
           "compressor_class", "compressor_options", "dynamic8_codebook", "mix_seed", "NoneCompressor",
           "FP16Compressor", "BF16Compressor", "TopKCompressor", "RandKCompressor",
           "TernaryCompressor", "Int8Compressor", "Dynamic8Compressor", "Sign1Compressor",
           "ChunkTopKCompressor"]


def is_exact(name: str) -> bool:
    """``comm=<name>`` sends exact fp32 values: the one representation of "no compression"
    is :class:`NoneCompressor` (``comm=none``), whose hook is the
    plain all-reduce and whose engine state, with no hook at all, is a bare ``thinwire.comm.hooks.HookState``."""
    return name in COMPRESSORS and compressor_class(name) is NoneCompressor
