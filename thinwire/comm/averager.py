"""Averaging one flat vector over ranks through the comm layer (compressor + error
feedback + collective), for strategies that synchronise parameters or pseudo-gradients
rather than DDP buckets (local updates, CO2). The flat vector concatenates named
parameters, so compression is layer-wise and feedback buffers are keyed by name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import accounting, groups
from .aggregator import CompressedAggregator
from .compressors import is_exact
from .futures import then


class CompressedAverager:
    """``average(names, sizes, flat, step)`` -> mean over ranks (fp32, same length).

    ``comm=none`` is an exact fp32 all-reduce. Otherwise every named piece is compressed
    on its own; the two-phase collective gets a second process group of its own, created
    here (all ranks construct the averager in the same order).

    ``step`` counts outer rounds: the first ``comm.warmup_steps`` rounds are exact fp32
    all-reduces, and so is the first round when the feedback rule starts from a dense
    message (``comm.init=dense``: EF21 / EControl initialised to the round's own
    pseudo-gradient, as the DDP hook does on its first step).
    """

    def __init__(self, comm_cfg, meter: accounting.WireMeter, group=None, group2=None, timeout_s=None):
        fields = OmegaConf.to_container(comm_cfg, resolve=True) if isinstance(comm_cfg, DictConfig) \
            else dict(comm_cfg)
        self.name = fields.pop("name")
        self.meter, self.group = meter, group
        self.aggregator = None
        self.warmup_rounds = int(fields.get("warmup_steps", 0))
        if not is_exact(self.name):  # comm=none: the plain all-reduce below
            self.aggregator = CompressedAggregator(self.name, fields, meter, group, group2)
            if self.aggregator.feedback.dense_init:
                self.warmup_rounds = max(self.warmup_rounds, 1)
            if (self.aggregator.collective == "two_phase" and group2 is None
                    and dist.is_initialized() and dist.get_world_size(group) > 1):
                self.aggregator.group2 = groups.new_group(
                    ranks=dist.get_process_group_ranks(group) if group else None, timeout_s=timeout_s)

    def average_async(self, names: list[str], sizes: list[int], flat: torch.Tensor,
                      step: int, contributors: int | None = None) -> torch.futures.Future:
        """``contributors``: how many ranks' values the sum holds (None: all; a planned absence
        sends zeros from the absent rank, ``thinwire.elastic.absence``; comm=none only)."""
        if self.aggregator is None:
            buf = flat.detach().float().clone()
            work = accounting.all_reduce(self.meter, buf, group=self.group, async_op=True)
            p = accounting.group_size(self.group) if contributors is None else contributors
            return then(work.get_future(), lambda f: f.value()[0].div_(p))
        if contributors is not None:
            raise ValueError("a mean over some contributors needs comm=none")
        pieces = list(flat.detach().float().split(sizes))
        if step < self.warmup_rounds:
            fut = self.aggregator.launch_dense(names, pieces)
        else:
            fut = self.aggregator.launch(names, pieces, step)
        return then(fut, lambda f: torch.cat(f.value()))

    def average(self, names: list[str], sizes: list[int], flat: torch.Tensor, step: int) -> torch.Tensor:
        return self.average_async(names, sizes, flat, step).wait()

    def commit(self, names: list[str] | None = None) -> None:
        if self.aggregator is not None:
            self.aggregator.commit(names)

    def discard(self) -> None:
        if self.aggregator is not None:
            self.aggregator.discard()

    def take_stats(self) -> dict:
        return self.aggregator.take_stats() if self.aggregator is not None else {}

    def state_dict(self) -> dict:
        return self.aggregator.state_dict() if self.aggregator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.aggregator is not None and state:
            self.aggregator.load_state_dict(state)
