"""The comm layer: wire-byte accounting, compressors, error feedback, collectives, DDP hooks,
and the sync strategies that decide when workers talk.

Public API::

    from thinwire.comm import build_compressor, comm_hook, HookState
"""

from . import outer  # noqa: F401  registers the built-in sync strategies local and co2 (local.py) in sync.SYNC_STRATEGIES
from .compressors import COMPRESSORS, build_compressor
from .hooks import HookState, comm_hook, comm_names

__all__ = ["COMPRESSORS", "HookState", "build_compressor", "comm_hook", "comm_names"]
