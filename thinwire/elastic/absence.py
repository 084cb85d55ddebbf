"""A planned absence in ``thinwire-train`` (``trainer.faults.absent_at="SLOT:FIRST..LAST"``):
slot SLOT takes no part in outer rounds FIRST..LAST (0-based; round r is global steps
r*H+1 .. (r+1)*H as the metrics' ``step`` counts them). It is the reference the elastic drills
compare a killed and restarted slot with (issue 33; ``tape.planned`` is its tape).

In those rounds the absent rank trains nothing (its batches are lost and audited in
``lost_steps``), its parameters stay at the anchor, so its pseudo-gradient is exactly zero, and
the round's mean is the sum divided by the live count (a live mask every rank derives from the
same config). It applies the same outer step as the others, so its consensus state (anchor,
outer optimizer) never leaves the live set's. It rejoins with the state rules of
docs/elastic.md: parameters = anchor, inner optimizer fresh (its state cleared), and its first
round is round LAST + 1.

Under a compressed comm (``comm=chunk_topk``, :class:`LiveRows`) every round's mean goes through
the elastic data phase's exchange (``thinwire.elastic.exchange``): each live rank's payload row in
an N x B all-reduce, decoded in slot order over the live ranks, so the mean is bitwise the one an
elastic run with the same live sets takes (gloo's ring would add 3 ranks in another order). The
absent rank sends nothing and its error-feedback residual is dropped at its first absent round
(the rule of a dead slot, whose residual dies with it); it rejoins with residual 0. It takes the
feedback step of a slot that sent zeros, so that the shared state (EF21's G) and with it its
outer step stay equal to the live ranks'.

Like DiLoCo's adaptive compute pool (Douillard et al. 2023, arXiv 2311.08105, Sec. 3), the
outer step averages over the replicas present; unlike its dropped-communication experiment,
the absent replica does no local work that is later thrown away.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..comm import accounting
from ..errors import need

KEY = "trainer.faults.absent_at"
FORMAT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*\.\.\s*(\d+)\s*$")


def parse(value: str, key: str = KEY) -> tuple[int, int, int]:
    """``"SLOT:FIRST..LAST"`` -> (slot, first, last); a ConfigError naming ``key`` otherwise."""
    m = FORMAT.match(str(value))
    need(m is not None, key, value, 'expected "SLOT:FIRST..LAST" (a slot and an inclusive range of '
         'outer rounds, 0-based), e.g. "1:3..5"')
    slot, first, last = (int(x) for x in m.groups())
    need(first <= last, key, value, f"the first round {first} is after the last {last}")
    return slot, first, last


def check_run(cfg, world: int, plugin_cls) -> None:
    """The rules that span groups (``thinwire.config.rules``): one line naming the key, exit 2."""
    value = cfg.trainer.faults.get("absent_at")
    if value is None:
        return
    slot, first, last = parse(value)
    s = cfg.sync
    need(s.name == "local", KEY, value, f"sync={s.name}: a planned absence needs sync=local or sync=diloco "
         + ("(sync=ddp is fail-stop: every step averages every rank's gradients)" if s.name == "ddp" else
            "(co2's in-flight mean and its staleness rule for an absent slot are not implemented)"))
    need(0 < slot < world, KEY, value, f"slot {slot} is not a slot of this run other than 0 (world size {world}; "
         "slot 0 writes the metrics line and cannot be absent)")
    rounds = cfg.trainer.max_steps // s.local_steps
    need(last < rounds, KEY, value, f"round {last} is past the run's last outer round {rounds - 1} "
         f"(trainer.max_steps={cfg.trainer.max_steps} / sync.local_steps={s.local_steps})")
    for k in ("fragments", "fragment_delay", "fragment_alpha", "moment1_every", "moment2_every"):
        plain = 1 if k == "fragments" else 0
        need(s.get(k, plain) == plain, KEY, value, f"sync.{k}={s.get(k)}: a planned absence runs one whole-model "
             f"round at a time (sync.{k}={plain})")
    from .config import comm_refusal
    bad = comm_refusal(cfg.comm)
    need(bad is None, KEY, value, bad and f"{bad[0]}={bad[1]}: a compressed mean under a planned absence: {bad[2]}")
    need(cfg.engine.name == "ddp", KEY, value, f"engine={cfg.engine.name}: replica groups are not covered; use "
         "engine=ddp")
    need(getattr(plugin_cls, "steps_torch_optimizer", False), KEY, value, f"optim={cfg.optim.name}: the joiner's "
         "fresh inner optimizer needs a torch optimizer (sgd, adamw, ...)")


def round_metrics(rnd: int, live: list[int], slots: int, steps: int) -> dict:
    """Outer round ``rnd``'s metrics keys (a planned absence's and ``elastic=torchft``'s):
    ``live_replicas``, ``live_slots`` and ``lost_steps`` (the untrained [slot, first step, last
    step] of the slots not live, 1-based as the metrics' ``step``)."""
    lost = [[s, rnd * steps + 1, (rnd + 1) * steps] for s in range(slots) if s not in live]
    return {"live_replicas": len(live), "live_slots": list(live), "lost_steps": lost}


@dataclass(frozen=True)
class PlannedAbsence:
    slot: int      # the absent slot (a rank of the fixed world)
    first: int     # its first absent outer round (0-based)
    last: int      # its last absent outer round
    slots: int     # N, the nominal slot count (the world size)
    steps: int     # H, inner steps per round

    @classmethod
    def of(cls, value, slots: int, steps: int) -> "PlannedAbsence | None":
        if value is None:
            return None
        return cls(*parse(value), slots=slots, steps=steps)

    def absent(self, slot: int, rnd: int) -> bool:
        return slot == self.slot and self.first <= rnd <= self.last

    def live(self, rnd: int) -> list[int]:
        """The slots that contribute to round ``rnd``'s mean."""
        return [s for s in range(self.slots) if not self.absent(s, rnd)]

    def trains(self, slot: int, step: int) -> bool:
        """Whether ``slot`` trains global step ``step`` (0-based, as the trainer's loop counts)."""
        return not self.absent(slot, step // self.steps)

    def rejoins(self, slot: int, step: int) -> bool:
        """``step`` (0-based) is the first step of ``slot``'s first round after its absence."""
        return slot == self.slot and step == (self.last + 1) * self.steps

    def round_metrics(self, rnd: int) -> dict:
        return round_metrics(rnd, self.live(rnd), self.slots, self.steps)

    def rows(self, strategy) -> "LiveRows":
        """The compressed round mean of ``strategy`` (the outer loop, ``thinwire.comm.local``),
        built on first use and kept on it."""
        rows = getattr(strategy, "live_rows", None)
        if rows is None:
            rows = strategy.live_rows = LiveRows(self, strategy.averager, strategy.space.names,
                                                 strategy.space.sizes, strategy.comm_cfg)
        return rows

    def lost_tokens(self, tokens_per_step: int) -> int:
        """Tokens (or samples) the absent slot did not train: its rounds x H x one rank's batch."""
        return (self.last - self.first + 1) * self.steps * tokens_per_step


class LiveRows:
    """The planned absence's round mean under a compressed comm (module docstring): the elastic
    data phase over the world's group, with the trainer's own compressor and feedback buffers
    (those of ``averager``'s aggregator: checkpointed with it)."""

    def __init__(self, absence: PlannedAbsence, averager, names: list[str], sizes: list[int], comm_cfg):
        from omegaconf import OmegaConf

        from .exchange import RowCodec
        fields = OmegaConf.to_container(comm_cfg, resolve=True) if not isinstance(comm_cfg, dict) else dict(comm_cfg)
        self.absence = absence
        self.codec = RowCodec(fields, names, sizes, feedback=averager.aggregator.feedback)

    def average(self, rank: int, rnd: int, delta: torch.Tensor, meter, group) -> torch.futures.Future:
        """Round ``rnd``'s mean (what the outer step takes) over the live ranks, as a done future."""
        from .protocol import live_mean

        live, N, codec = self.absence.live(rnd), self.absence.slots, self.codec
        codec.live = self.absence.live(rnd - 1) if rnd > 0 else None   # from the plan: nothing to checkpoint
        if rank not in live and rnd == self.absence.first:
            codec.reset()   # a dead slot's residual dies with it
        dense = codec.dense(rnd, live)
        rows = (torch.zeros(N, delta.numel()) if dense else torch.zeros(N, codec.row_bytes, dtype=torch.uint8))
        enc = None
        if rank in live:
            enc = None if dense else codec.encode(delta, rnd)
            rows[rank] = delta if dense else enc.row
        accounting.all_reduce(meter, rows, group=group)
        mine = {s: rows[s] for s in live}
        mean = live_mean(mine) if dense else codec.mean(mine)
        if dense:  # the absent rank takes the dense step too (EF21's restart), its own part from zeros
            enc = codec.dense_step(delta, mean, rnd)
        else:
            enc = enc if enc is not None else codec.idle()
            mean = codec.step(enc, mean)
        codec.commit(enc)
        fut = torch.futures.Future()
        fut.set_result(mean)
        return fut
