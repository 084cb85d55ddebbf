"""The comm layer: wire-byte accounting, compressors, error feedback, collectives, DDP hooks,
and the sync strategies that decide when workers talk."""

from .hooks import HookState, comm_hook

__all__ = ["HookState", "comm_hook"]
