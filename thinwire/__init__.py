"""thinwire: data-parallel training of PyTorch models when the network is the bottleneck.

The library API for a training loop of your own (docs/library.md)::

    from thinwire import comm_hook, OuterLoop, WireMeter, ByteCounts
    from thinwire.optim import MeZO, ZODist, lora_ga_init

Names are imported on first use, so ``import thinwire`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "comm_hook": "thinwire.comm.hooks",
    "OuterLoop": "thinwire.outer_loop",
    "WireMeter": "thinwire.meter",
    "ByteCounts": "thinwire.meter",
    "allreduce_bytes": "thinwire.meter",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thinwire' has no attribute {name!r}")
