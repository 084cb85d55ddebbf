"""Data-parallel zeroth-order optimisation with shared randomness ("Just One Byte",
Zelikman et al. 2023, extending MeZO): ranks exchange scalars, never gradients.

``optim.zo_mode``:

- ``shared``: every rank perturbs along the same z(s(step)) on its own batch and the
  projected gradients are all-reduced (mean): one fp32 per sample, 4 bytes in, the same
  as ``optim=mezo`` on p ranks.
- ``per_rank`` (default): rank i perturbs along its own z(s(step, i)); the p projected
  gradients are all-gathered as one int8 each and every rank, the sender included,
  applies ``theta -= lr/p * sum_i q(g_i) z(s(step, i))`` with the same dequantised q(g_i)
  (Zelikman et al. 2023: seeds from a (machine, sample) identifier, so every machine
  regenerates every other's perturbation; one-byte projected gradients).
  Each rank's message is 3 bytes: its int8 q and its loss as fp16 (for logging: the
  trainer's control packet is not needed, see ``MeZOPlugin.agreement``); a ring
  all-gather sends 3 (p-1) bytes per rank (3 at p = 2, 6 at p = 3).

Quantisation scale, agreed without sending it: q(g) = clamp(round(g / delta), -127, 127)
with delta a power of two held in the plugin state. After each step every rank sees the
same gathered bytes, so every rank updates delta by the same rule: the largest |q| hit
the clamp -> delta *= 2; it used fewer than 5 bits (< 32) -> delta /= 2. The largest
value of the next step then keeps 5-7 bits, and no byte is spent on the scale. A
non-finite g is sent as -128, so every rank sees it and skips the step together.

Bitwise identity: adding then removing eps z is not exactly reversible in floating
point, and with per-rank seeds every rank would be left with a different rounding
residue. So every rank replays the parameter arithmetic of every rank's perturbation
cycle, in rank order, and evaluates the model only inside its own: the parameters
follow the same float operations everywhere (cost: p noise passes, no extra forwards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import accounting
from ..errors import need, one_of, positive
from .mezo import MeZO, MeZOOptions, MeZOPlugin, add_noise, rank_and_size, spsa_cycle, zo_seed
from .plugins import OPTIMIZERS

QMAX = 127
NONFINITE = -128


def quantise(g: torch.Tensor, delta: float) -> torch.Tensor:
    """fp32 projected gradients -> int8 multiples of ``delta`` (-128 marks non-finite)."""
    q = torch.clamp(torch.round(g.double() / delta), -QMAX, QMAX)
    q = torch.where(torch.isfinite(g), q, torch.full_like(q, NONFINITE))
    return q.to(torch.int8)


def dequantise(q: torch.Tensor, delta: float) -> torch.Tensor:
    return q.to(torch.float32) * delta


def next_delta(q: torch.Tensor, delta: float) -> float:
    """The scale rule every rank applies to the same gathered bytes (see the module doc)."""
    finite = q[q != NONFINITE]
    if finite.numel() == 0:
        return delta
    m = int(finite.abs().max())
    if m >= QMAX:
        return delta * 2.0
    if m < 32 and delta > 2.0 ** -100:
        return delta * 0.5
    return delta


@dataclass
class ZODistOptions(MeZOOptions):
    zo_mode: str = "per_rank"        # shared (one seed, fp32 all-reduce) | per_rank (1 byte each)
    zo_qstep: float = 0.0625         # per_rank: initial int8 quantisation step (adapted each step)

    def check(self) -> None:
        super().check()
        one_of(self.zo_mode, ("shared", "per_rank"), "zo_mode")
        positive(self, "zo_qstep")


class ZODist(MeZO):
    """``zo_dist`` as a ``torch.optim.Optimizer`` (the module docstring; ``mode="per_rank"``:
    one byte per rank and sample; ``"shared"``: :class:`MeZO` on several ranks). Same
    ``step(closure)`` contract as :class:`MeZO`; every rank must step together. State: the
    step counter and the quantisation scale, identical on every rank."""

    def __init__(self, params, lr: float = 1e-6, *, mode: str = "per_rank", qstep: float = 0.0625, **kw):
        one_of(mode, ("shared", "per_rank"), "mode")
        need(qstep > 0, "qstep", qstep, "must be positive")
        super().__init__(params, lr, **kw)
        self.mode = mode
        self.delta = float(qstep)
        self.q: torch.Tensor | None = None      # gathered bytes of this step, [p, samples]

    @torch.no_grad()
    def estimate(self, closure) -> torch.Tensor:
        if self.mode == "shared":
            return super().estimate(closure)
        rank, p = rank_and_size(self.process_group)
        g, losses = [], []
        for k in range(self.samples):
            for j in range(p):
                out = spsa_cycle(self.params, zo_seed(self.seed, self.t, k, j), self.eps, self.chunk,
                                 closure if j == rank else None)
                if out is not None:
                    g.append((out[0] - out[1]) / (2 * self.eps))
                    losses.append((out[0] + out[1]) / 2)
        loss = torch.stack(losses).mean()
        # message = [q_1 .. q_n, loss as the 2 bytes of an fp16], int8 throughout
        mine = torch.cat([quantise(torch.stack(g).float(), self.delta),
                          loss.detach().to(torch.float16).reshape(1).view(torch.int8)])
        n = mine.numel()
        gathered = torch.empty(p * n, dtype=torch.int8, device=mine.device)
        accounting.all_gather_into(self.meter, gathered, mine, group=self.process_group, kind="data")
        rows = gathered.view(p, n).cpu()
        self.q = rows[:, :self.samples].contiguous()
        self.grads = dequantise(self.q, self.delta)
        # a fresh 1-D copy: with one rank the slice is contiguous already, at an odd byte offset,
        # which .contiguous() keeps and a reinterpretation as fp16 refuses
        losses_all = rows[:, self.samples:].reshape(-1).clone().view(torch.float16).float()
        self.loss_mean = float(losses_all.double().sum()) / p
        return loss

    def finite(self) -> bool:
        if self.mode == "shared":
            return super().finite()
        return self.q is not None and bool((self.q != NONFINITE).all())

    @torch.no_grad()
    def update(self) -> None:
        if self.mode == "shared":
            return super().update()
        p = self.q.shape[0]
        self.decay()
        for k in range(self.samples):
            for j in range(p):
                coeff = float(self.grads[j, k])
                if coeff != 0.0:
                    add_noise(self.params, zo_seed(self.seed, self.t, k, j), self.scales(coeff, p * self.samples),
                              self.chunk)
        self.delta = next_delta(self.q, self.delta)
        self.end_step()

    def end_step(self) -> None:
        super().end_step()
        self.q = None

    def zo_state(self) -> dict:
        return {"t": self.t, "qstep": self.delta}

    def load_zo_state(self, state: dict) -> None:
        self.t = int(state["t"])
        self.delta = float(state.get("qstep", self.delta))


@OPTIMIZERS.register("zo_dist")
class ZODistPlugin(MeZOPlugin):
    """``optim=zo_dist``: the trainer's driver of :class:`ZODist`."""

    Config = ZODistOptions

    def make_optimizer(self, groups) -> ZODist:
        c = self.cfg
        return ZODist(groups, lr=c.lr, mode=c.zo_mode, qstep=c.zo_qstep, eps=c.zo_eps, samples=c.zo_samples,
                      chunk=c.zo_chunk, seed=c.zo_seed, meter=self.meter)

    @property
    def delta(self) -> float:
        return self.optimizer.delta

    def apply(self, step: int) -> dict[str, float]:
        qstep = self.optimizer.delta
        out = super().apply(step)
        return out if self.cfg.zo_mode == "shared" else {**out, "zo_qstep": qstep}
