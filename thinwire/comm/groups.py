"""Process groups: every group thinwire creates (``World.async_group``, the averager's
second group, the ZeRO replica layout) comes from :func:`new_group`, with the run's
collective timeout (``dist.timeout_s``), so a hung peer fails the job after the same time
whichever group it hangs in. ``torch.distributed.new_group`` without a timeout would use
torch's default (30 min on gloo, 10 min on NCCL) instead of the one the default group got.

``init_world`` records the timeout (:func:`set_timeout`); a process that initialised the
default group itself (tests, library use) gets torch's default unless it calls it.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist

_timeout_s: float | None = None


def set_timeout(timeout_s: float | None) -> None:
    """The timeout of every group :func:`new_group` creates from now on (seconds; None:
    torch's default)."""
    global _timeout_s
    _timeout_s = None if timeout_s is None else float(timeout_s)


def new_group(ranks: list[int] | None = None, *, backend: str | None = None):
    """``torch.distributed.new_group`` over ``ranks`` (None: all ranks) with the run's
    timeout. Like it, every rank of the world must call this, in the same order and with
    the same ``ranks``, whether or not it is a member."""
    timeout = None if _timeout_s is None else datetime.timedelta(seconds=_timeout_s)
    return dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
