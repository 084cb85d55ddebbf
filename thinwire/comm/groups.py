"""Process groups: every group thinwire creates (``World.async_group``, the averager's
second group, the ZeRO replica layout) comes from :func:`new_group`, with the run's
collective timeout (``dist.timeout_s``, carried by ``World.timeout_s`` and passed
explicitly), so a hung peer fails the job after the same time whichever group it hangs in.
``torch.distributed.new_group`` without a timeout would use torch's default (30 min on gloo,
10 min on NCCL) instead of the one the default group got. No module state: a process that
initialised the default group itself (tests, library use) passes its own timeout or gets
torch's default.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist


def new_group(ranks: list[int] | None = None, *, backend: str | None = None, timeout_s: float | None = None):
    """``torch.distributed.new_group`` over ``ranks`` (None: all ranks) with ``timeout_s``
    (None: torch's default). Like it, every rank of the world must call this, in the same
    order and with the same ``ranks``, whether or not it is a member."""
    timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
    return dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
