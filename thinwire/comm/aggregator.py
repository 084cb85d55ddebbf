"""Compressor + error feedback + collective, over named segments: the core that both the
DDP comm hook (per bucket) and the outer all-reduce of local updates / CO2 (pseudo-
gradients) use.

One call aggregates a list of named 1-D tensors. Feedback buffers and the two-phase
server-side errors are keyed by name; their new values are *staged* and applied by
``commit()`` once the step is accepted (``discard()`` drops them), so a skipped step
leaves every buffer exactly as it was.
"""
from __future__ import annotations

import math

import torch

from . import accounting, collectives
from .compressors import Compressor, build_compressor, compressor_options
from .feedback import build_feedback
from .futures import then


def compressor_from_config(name: str, fields: dict):
    """Build compressor ``name`` from a comm config: its own options and the group-wide seed."""
    accepted = compressor_options(name)
    return build_compressor(name, **{k: v for k, v in fields.items() if k in accepted})


def check_combination(compressor: Compressor, fields: dict) -> str:
    """The collective that ``compressor`` (built from the comm config ``fields``) is
    aggregated by; raises ValueError on a combination that cannot be exact (EF21 / EControl
    need exact aggregation, see feedback.py)."""
    kind = collectives.select_collective(compressor, fields.get("collective", "auto"))
    fb = build_feedback(fields.get("feedback", "none"))
    if fields.get("sparsity_warmup") and "ratio" not in compressor_options(compressor.name):
        raise ValueError(f"sparsity_warmup={fields['sparsity_warmup']}: schedules comm.ratio, which "
                         f"comm={compressor.name} does not have (use topk or randk)")
    if fb.needs_exact_aggregation and kind == "two_phase":
        raise ValueError(f"comm.feedback={fields.get('feedback')}: needs exact aggregation, but "
                         f"comm={compressor.name} uses the two_phase collective; set comm.collective=allgather")
    return kind


class CompressedAggregator:
    def __init__(self, name: str, fields: dict, meter: accounting.WireMeter, group=None, group2=None):
        self.name, self.fields = name, dict(fields)
        self.compressor = compressor_from_config(name, fields)
        self._by_density: dict[float, Compressor] = {}   # DGC's sparsity warm-up: one per stage
        self.collective = check_combination(self.compressor, fields)
        self.feedback = build_feedback(fields.get("feedback", "none"),
                                       **{k: v for k, v in fields.items() if k != "name"})
        self.min_numel = int(fields.get("min_numel", 0))
        self.meter, self.group, self.group2 = meter, group, group2
        self.server_errors: dict[str, torch.Tensor] = {}
        self.sequencer = collectives.Sequencer()  # orders the second phases issued on group2
        self.staged: dict[str, dict[str, torch.Tensor]] = {}
        self.stats = {"payload_bytes": 0, "raw_bytes": 0, "residual_sq": 0.0}

    # -- one aggregation ----------------------------------------------------------
    def launch(self, names: list[str], grads: list[torch.Tensor], iteration: int,
               lr_ratio: float = 1.0) -> torch.futures.Future:
        """Future of what the optimizer sees for each named 1-D gradient; stages buffers."""
        fb = self.feedback
        compressor = self._compressor_at(iteration)
        msgs = [fb.message(n, g.float(), lr_ratio) for n, g in zip(names, grads)]
        big = [i for i, m in enumerate(msgs) if m.numel() >= self.min_numel]
        small = [i for i, m in enumerate(msgs) if m.numel() < self.min_numel]
        sent: list = [None] * len(msgs)
        futs, extra = [], None
        if big:
            errs = [self._server_error(names[i], msgs[i]) for i in big]
            sent_big, fut_big, extra, nbytes = collectives.launch(
                [msgs[i] for i in big], compressor, self.meter, collective=self.collective,
                steps=[collectives.segment_step(iteration, names[i]) for i in big],
                group=self.group, group2=self.group2, server_errors=errs, sequencer=self.sequencer)
            for i, s in zip(big, sent_big):
                sent[i] = s
            futs.append(fut_big)
            self.stats["payload_bytes"] += nbytes
        if small:  # small tensors go uncompressed: one exact fp32 all-reduce
            flat = torch.cat([msgs[i] for i in small])
            work = accounting.all_reduce(self.meter, flat, group=self.group, async_op=True)
            p = accounting.group_size(self.group)
            futs.append(then(work.get_future(), lambda f: list(f.value()[0].div_(p).split(
                [msgs[i].numel() for i in small]))))
            for i in small:
                sent[i] = msgs[i]

        def finish(all_done) -> list[torch.Tensor]:
            done = all_done.value()  # raises the collective's own error if one failed
            means: list = [None] * len(msgs)
            k = 0
            if big:
                for i, m in zip(big, done[0].value()):
                    means[i] = m
                    if extra is not None and extra.server_errors[big.index(i)] is not None:
                        self._stage(names[i], server_e=extra.server_errors[big.index(i)])
                k = 1
            if small:
                for i, m in zip(small, done[k].value()):
                    means[i] = m
            outs = []
            for i, n in enumerate(names):
                out, bufs = fb.result(n, grads[i].float(), msgs[i], sent[i], means[i])
                self._stage(n, **bufs)
                self.stats["residual_sq"] += fb.residual_sq(bufs)
                outs.append(out)
            return outs

        self.stats["raw_bytes"] += sum(4 * m.numel() for m in msgs)
        self.stats["payload_bytes"] += 4 * sum(msgs[i].numel() for i in small)
        return then(torch.futures.collect_all(futs), finish)

    def launch_dense(self, names: list[str], grads: list[torch.Tensor]) -> torch.futures.Future:
        """An uncompressed round (warm-up): exact mean; initialises EF21 / EControl."""
        flat = torch.cat([g.float().reshape(-1) for g in grads])
        work = accounting.all_reduce(self.meter, flat, group=self.group, async_op=True)
        p = accounting.group_size(self.group)
        local = [g.float().clone() for g in grads]

        def finish(f) -> list[torch.Tensor]:
            means = list(f.value()[0].div_(p).split([g.numel() for g in grads]))
            if self.feedback.dense_init:
                for n, g, m in zip(names, local, means):
                    self._stage(n, **self.feedback.dense(n, g, m))
            return means

        return then(work.get_future(), finish)

    def _compressor_at(self, iteration: int) -> Compressor:
        """The compressor of ``iteration``: the configured one, or one of the feedback rule's
        density schedule (DGC's sparsity warm-up) with its own ``ratio``."""
        ratio = getattr(self.compressor, "ratio", None)
        if ratio is None:
            return self.compressor
        d = self.feedback.density(iteration, ratio)
        if d == ratio:
            return self.compressor
        if d not in self._by_density:
            self._by_density[d] = compressor_from_config(self.name, {**self.fields, "ratio": d})
        return self._by_density[d]

    def _server_error(self, name: str, msg: torch.Tensor):
        if self.collective != "two_phase":
            return None
        err = self.server_errors.get(name)
        if err is None:
            err = collectives.new_server_error(msg.numel(), self.compressor, self.group, msg.device)
        return err

    # -- staging -----------------------------------------------------------------
    def _stage(self, name: str, **bufs: torch.Tensor) -> None:
        self.staged.setdefault(name, {}).update(bufs)

    def commit(self, names: list[str] | None = None) -> None:
        """Apply the staged buffers (of ``names`` only, when given: other aggregations may still
        be staging theirs from gloo's thread, e.g. the fragments in flight of the outer loop)."""
        if names is None:
            staged, self.staged = self.staged, {}
        else:
            staged = {n: self.staged.pop(n) for n in names if n in self.staged}
        for name, bufs in staged.items():
            if "server_e" in bufs:
                self.server_errors[name] = bufs.pop("server_e")
        self.feedback.commit(staged)

    def discard(self) -> None:
        self.staged = {}

    def take_stats(self) -> dict[str, float]:
        s = self.stats
        out = {"compression_ratio": s["raw_bytes"] / s["payload_bytes"] if s["payload_bytes"] else 1.0,
               "residual_norm": math.sqrt(s["residual_sq"])}
        self.stats = {"payload_bytes": 0, "raw_bytes": 0, "residual_sq": 0.0}
        return out

    def state_dict(self) -> dict:
        return {"feedback": self.feedback.state_dict(),
                "server_errors": {k: v.clone() for k, v in self.server_errors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.load_state_dict(state["feedback"])
        self.server_errors = {k: v.clone() for k, v in state["server_errors"].items()}
