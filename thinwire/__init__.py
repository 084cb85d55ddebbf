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

#: The public surface beyond ``__all__``: the modules the README and docs/ import from
#: (tests/test_public_api.py imports every name they use). A name here that moves keeps a
#: shim at its old path for at least one release, warning ``DeprecationWarning`` at import
#: (e.g. ``thinwire.trainer.config`` -> ``thinwire.config``).
PUBLIC_MODULES = (
    "thinwire",
    "thinwire.config",                      # compose, validate, to_yaml, expand_sweep
    "thinwire.errors",                      # ConfigError, need, positive, ... (a part's own checks)
    "thinwire.comm",                        # comm_hook, build_compressor, HookState
    "thinwire.comm.compressors",            # Compressor, Payload (a compressor of your own)
    "thinwire.comm.compressors.base",       # blocks, check_block_size, generator
    "thinwire.comm.sync",                   # SyncStrategy (a sync strategy of your own)
    "thinwire.comm.outer",                  # ModuleParams
    "thinwire.comm.averager",               # CompressedAverager
    "thinwire.data.base",                   # DataInfo, TRAIN, EVAL, shard_bounds (a data set of your own)
    "thinwire.optim",                       # MeZO, ZODist, lora_ga_init
    "thinwire.optim.plugins",               # OptimizerPlugin, BackpropPlugin, ... (a plugin of your own)
    "thinwire.integrations.lightning",      # ThinwireCommHook
    "thinwire.elastic.membership",          # TorchftMembership (elastic replicas, docs/elastic.md)
    "thinwire.elastic.protocol",            # ElasticRunner
    "thinwire.elastic.replica",             # Replica, ReplicaSpec
    "thinwire.elastic.exchange",            # RowCodec (compressed pseudo-gradient rows)
)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thinwire' has no attribute {name!r}")
