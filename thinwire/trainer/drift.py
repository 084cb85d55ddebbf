"""The replica-drift guard: the state every rank must hold bitwise equal, checked by hash.

Data-parallel training is correct only while replicas agree. Each sync strategy declares
its *consensus state* (``SyncStrategy.consensus_state``: the parameters under ``sync=ddp``,
whatever the compressor or an optimizer plugin that owns its exchange; the anchor and the
outer optimizer's momentum after each outer step under ``local``/``co2``, whose live
parameters legitimately differ), and so may an optimizer plugin
(``OptimizerPlugin.consensus_state``, state it keeps identical on every rank). Every
``trainer.drift_check_every`` steps (auto: once per outer round, or every 100 steps when
ranks synchronise every step; always at a round boundary) each rank hashes the raw bytes of
that state into 64 bits (BLAKE2b, per tensor, then over the tensors' digests); the 8-byte
hash and the rank's 8-byte count of skipped steps are all-gathered over the ranks that must
agree (the world, or under ZeRO replica groups the ranks holding the same shard), counted as
control traffic (16 bytes per rank). On a mismatch, a
second all-gather of the per-tensor digests finds the first tensor that differs and the
rank(s) that differ from the majority, and every rank stops with one line naming the step,
the tensor and the rank.

A strategy whose ranks diverge declares what must still agree; one that declares nothing
(``consensus_state()`` is None) is not checked: the guard prints one start-up line
(``drift guard off for sync=<name>: it declares no consensus state``) and never alarms.

A hash, not a tolerance: the strategies here are deterministic and bitwise identical across
ranks by construction (fixed reduction order, the same mean on every rank), so any
difference, one ulp included, is a bug or a fault (a flipped bit, a rank that missed a
round, state restored from another run).
"""
from __future__ import annotations

import hashlib
from collections import Counter

import torch
import torch.distributed as dist

from ..comm import accounting
from ..errors import ReplicaDriftError

AUTO_EVERY_STEP = 100  # auto period when ranks synchronise every step
STOP_FLAG = 1 << 40    # added to a rank's skipped count in the check's all-gather: its Ctrl-C (no extra byte)


def tensor_digest(t: torch.Tensor) -> int:
    """64-bit BLAKE2b of a tensor's raw bytes (dtype and shape included), as a signed int64."""
    if hasattr(t, "full_tensor"):  # a DTensor (engine=fsdp2): the whole tensor, gathered (every rank calls)
        t = t.full_tensor()
    h = hashlib.blake2b(repr((str(t.dtype), tuple(t.shape))).encode(), digest_size=8)
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest(), "little", signed=True)


def combined_digest(digests: list[int]) -> int:
    h = hashlib.blake2b(b"".join(d.to_bytes(8, "little", signed=True) for d in digests), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


def check_period(every: int | None, round_steps: int) -> int:
    """Steps between checks, a multiple of the strategy's round (0: off)."""
    if every is None:
        every = round_steps if round_steps > 1 else AUTO_EVERY_STEP
    if every <= 0:
        return 0
    return -(-every // round_steps) * round_steps


class DriftGuard:
    def __init__(self, every: int | None, sync, plugin, world, meter):
        self.sync, self.plugin, self.world, self.meter = sync, plugin, world, meter
        self.period = check_period(every, sync.round_steps) if world.world_size > 1 else 0
        if self.period and sync.consensus_state() is None:
            self.period = 0
            if world.is_main:
                name = getattr(getattr(sync, "cfg", None), "name", type(sync).__name__)
                print(f"thinwire: drift guard off for sync={name}: it declares no consensus state", flush=True)

    def due(self, done: int) -> bool:
        return self.period > 0 and done % self.period == 0

    def state(self) -> dict[str, torch.Tensor]:
        state = dict(self.sync.consensus_state())
        state.update({f"optim.{k}": v for k, v in self.plugin.consensus_state().items()})
        return state

    stop_agreed = False  # a rank's Ctrl-C rode on the last check (``check(stop=True)``: zeroth order)

    def check(self, done: int, skipped: int = 0, stop: bool = False) -> dict[int, int]:
        """Raise :class:`ReplicaDriftError` unless every rank's consensus state hashes the
        same; returns each rank's ``skipped`` (its count of skipped steps, carried in the same
        all-gather: under local/CO2 ranks skip steps alone, and this is where rank 0 learns
        of its peers' skips)."""
        state = self.state()
        names = list(state)
        digests = [tensor_digest(state[n]) for n in names]
        group = self.sync.consensus_group
        hashes = self._gather([combined_digest(digests), skipped + STOP_FLAG * bool(stop)], group)
        self.stop_agreed = any(h[1] >= STOP_FLAG for h in hashes)  # the same gathered votes on every rank
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world.world_size))
        if len({h[0] for h in hashes}) == 1:
            return {r: h[1] % STOP_FLAG for r, h in zip(ranks, hashes)}
        per_tensor = self._gather(digests, group)
        for i, name in enumerate(names):
            values = [d[i] for d in per_tensor]
            if len(set(values)) > 1:
                break
        counts = Counter(values)
        majority, n = counts.most_common(1)[0]
        reference = majority if n > len(values) // 2 else values[0]
        ref_rank = ranks[values.index(reference)]
        odd = [ranks[r] for r, v in enumerate(values) if v != reference]
        who = f"rank {odd[0]}" if len(odd) == 1 else "ranks " + ", ".join(map(str, odd))
        raise ReplicaDriftError(
            f"replica drift after step {done}: {name} on {who} differs from rank {ref_rank} (the "
            f"{type(self.sync).__name__} strategy keeps it bitwise equal on every rank); the replicas no "
            f"longer train one model: resume from a checkpoint written before step {done}")

    def _gather(self, values: list[int], group) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64, device=self.world.device)
        p = accounting.group_size(group)
        out = torch.empty(p * mine.numel(), dtype=torch.int64, device=self.world.device)
        accounting.all_gather_into(self.meter, out, mine, group=group, kind="control")
        return out.view(p, -1).tolist()
