"""Streaming DiLoCo's fragments (``sync.fragments``): the plain data of ``thinwire.comm.rounds``."""
from .rounds import block_of, strided_fragments

__all__ = ["block_of", "strided_fragments"]
