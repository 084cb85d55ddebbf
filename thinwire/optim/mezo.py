"""MeZO: zeroth-order SGD in place (Malladi et al. 2023, "Fine-Tuning Language Models
with Just Forward Passes": the SPSA estimate of Definition 1 applied in place as in
Algorithm 1), as a forward-only optimizer plugin.

Per step and per SPSA sample k, with seed s = seed(step, k)::

    theta += eps z(s);  l+ = L(theta)       z(s) ~ N(0, I), regenerated from s every time
    theta -= 2 eps z(s); l- = L(theta)
    theta += eps z(s)                          (restore, to float rounding)
    g = (l+ - l-) / (2 eps)                    projected gradient, a scalar
    theta -= lr * (g z(s) + wd * theta)        wd only on >= 2-D parameters

z is never stored: it is regenerated parameter by parameter, in chunks of
``optim.zo_chunk`` elements, from a dedicated ``torch.Generator`` seeded per
(s, parameter index). Peak memory is therefore inference + one chunk, even when one
parameter (an embedding) is half the model, and the global RNG (dropout, data) is
never touched. Losses are evaluated in eval mode (dropout off, as the reference does).

Gradient accumulation (``optim.zo_accum``) splits the rank's batch into micro-batches
evaluated at the same perturbed point, so g is the mean of the micro-batches'
projected gradients along the same z (memory: one micro-batch's activations). On p
ranks ``optim=mezo`` all-reduces the mean of g (the shared-seed variant of
``optim=zo_dist``), so ranks never drift apart.

What the trainer's per-step control packet carries (the mean loss for logging, the
non-finite flag) rides on this exchange instead: a non-finite l+ or l- makes g
non-finite, so the summed g already tells every rank to skip, and the loss travels
as one fp16 (``agreement()``). Per rank and step: a 4-byte fp32 all-reduce of g and a
2-byte fp16 all-reduce of the loss, 2 (p-1)/p * 6 bytes (6 at p = 2, 8 at p = 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..comm import accounting
from ..errors import need, positive
from .plugins import OPTIMIZERS, OptimizerPlugin

MASK64 = (1 << 63) - 1


def zo_seed(base: int, step: int, sample: int, rank: int = 0) -> int:
    """The seed of perturbation (step, sample, rank); a pure function, so every rank can
    regenerate every other rank's z and a resumed run draws the same ones."""
    key = [int(k) & 0xFFFFFFFF for k in (base, step, sample, rank)]
    return int(np.random.SeedSequence(key).generate_state(2, dtype=np.uint64)[0]) & MASK64


def _chunks(p: torch.Tensor, chunk: int):
    """Flat in-place views of ``p`` of at most ``chunk`` elements (the whole tensor when it
    is not contiguous: rare, and then z is drawn at its shape, still from the same seed)."""
    if not p.is_contiguous():
        yield p.data
        return
    flat = p.data.view(-1)
    for lo in range(0, flat.numel(), chunk):
        yield flat[lo:lo + chunk]


@torch.no_grad()
def add_noise(params: list[torch.Tensor], seed: int, scale: float, chunk: int) -> None:
    """theta += scale * z(seed), z regenerated chunk by chunk (no parameter-sized temporaries)."""
    gen = None
    for i, p in enumerate(params):
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device)
        gen.manual_seed((seed + 0x9E3779B97F4A7C15 * (i + 1)) & MASK64)
        for view in _chunks(p, chunk):
            z = torch.randn(view.shape, generator=gen, device=p.device, dtype=p.dtype)
            view.add_(z, alpha=scale)


@torch.no_grad()
def decay(params: list[torch.Tensor], decay_mask: list[bool], factor: float) -> None:
    """Decoupled weight decay theta *= factor on the masked (matrix) parameters."""
    if factor != 1.0:
        for p, m in zip(params, decay_mask):
            if m:
                p.mul_(factor)


def split_batch(batch: dict, n: int) -> list[dict]:
    """``n`` equal micro-batches along dim 0 (the batch size must be divisible by n)."""
    size = next(iter(batch.values())).shape[0]
    if size % n:
        raise ValueError(f"optim.zo_accum={n}: must divide the per-rank batch size {size}")
    return [{k: v[i * size // n:(i + 1) * size // n] for k, v in batch.items()} for i in range(n)]


@torch.no_grad()
def mean_loss(model, micro: list[dict]) -> torch.Tensor:
    losses = torch.stack([model(**mb) for mb in micro])
    return losses.float().mean() if losses.dtype in (torch.float16, torch.bfloat16) else losses.mean()


@torch.no_grad()
def perturbation_cycle(model, params, seed: int, eps: float, chunk: int, micro: list[dict] | None):
    """+eps z, evaluate, -2 eps z, evaluate, +eps z. With ``micro=None`` only the parameter
    arithmetic is replayed (zo_dist: every rank replays every rank's cycle, so the
    rounding left by the restore is the same on all ranks and they stay bitwise equal).
    Returns (l+, l-) or None."""
    add_noise(params, seed, eps, chunk)
    lp = mean_loss(model, micro) if micro is not None else None
    add_noise(params, seed, -2 * eps, chunk)
    lm = mean_loss(model, micro) if micro is not None else None
    add_noise(params, seed, eps, chunk)
    return None if micro is None else (lp, lm)


def decay_mask(named: list[tuple[str, torch.Tensor]]) -> list[bool]:
    """Weight decay skips biases and norm weights (the reference tests the names for
    'bias' and 'layer_norm'; 1-D covers both here, and LayerNorm spelt any way)."""
    return [p.dim() >= 2 for _, p in named]


@dataclass
class MeZOOptions:
    zo_eps: float = 1e-3             # perturbation size
    zo_samples: int = 1              # n-SPSA: perturbations (seeds) per step
    zo_accum: int = 1                # micro-batches per rank batch, same z, projected grads averaged
    zo_chunk: int = 1048576          # elements of z drawn at a time: peak memory = inference + one chunk
    zo_seed: int = 0                 # base of the per-step perturbation seeds

    def check(self) -> None:
        positive(self, "zo_eps", "zo_samples", "zo_accum", "zo_chunk")


@OPTIMIZERS.register("mezo")
class MeZOPlugin(OptimizerPlugin):
    """ZO-SGD in place. ``compute`` runs the perturbation cycles (the loss it returns is the
    mean of l+ and l-), ``apply`` the update; state = the step counter (seeds are a
    function of it), identical on every rank."""

    Config = MeZOOptions
    needs_backprop = False
    shared_seed = True          # mezo: every rank perturbs along the same z

    @classmethod
    def check_run(cls, cfg) -> None:
        need(cfg.data.batch_size % cfg.optim.zo_accum == 0, "optim.zo_accum", cfg.optim.zo_accum,
             f"must divide data.batch_size={cfg.data.batch_size}")

    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        named = self.trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.mask = decay_mask(named)
        self.rank = self.world.rank if self.world is not None else 0
        self.world_size = self.world.world_size if self.world is not None else 1
        self.meter = self.meter if self.meter is not None else accounting.WireMeter()
        self.t = 0              # perturbation counter: seeds are zo_seed(cfg.zo_seed, t, k, rank)
        self.grads: torch.Tensor | None = None   # this step's projected gradients, one per sample
        self.loss_mean = float("nan")            # this step's loss, averaged over ranks

    # -- one step --------------------------------------------------------------------
    def seeds(self, rank: int) -> list[int]:
        return [zo_seed(self.cfg.zo_seed, self.t, k, rank) for k in range(self.cfg.zo_samples)]

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        c = self.cfg
        micro = split_batch(batch, c.zo_accum)
        was_training = forward_model.training
        forward_model.eval()
        g, losses = [], []
        for seed in self.seeds(0 if self.shared_seed else self.rank):
            lp, lm = perturbation_cycle(forward_model, self.params, seed, c.zo_eps, c.zo_chunk, micro)
            g.append((lp - lm) / (2 * c.zo_eps))
            losses.append((lp + lm) / 2)
        forward_model.train(was_training)
        loss = torch.stack(losses).mean()
        self.grads, self.loss_mean = self.exchange(torch.stack(g).float(), loss)
        return loss

    def exchange(self, g: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean projected gradient (fp32, one per sample) and mean loss (fp16) over ranks."""
        if self.world_size == 1:
            return g, float(loss)
        accounting.all_reduce(self.meter, g, kind="data")
        packed = loss.detach().to(torch.float16).reshape(1)
        accounting.all_reduce(self.meter, packed, kind="data")
        return g / self.world_size, float(packed.float()) / self.world_size

    def local_finite(self) -> bool:
        return self.grads is not None and bool(torch.isfinite(self.grads).all())

    def agreement(self) -> tuple[float, bool]:
        """(mean loss over ranks, every rank finite) of this step, already agreed by the
        exchange in ``compute``: a trainer can use it instead of its own control packet."""
        return self.loss_mean, self.local_finite()

    def apply(self, step: int) -> dict[str, float]:
        lr = self.lr(step)
        c = self.cfg
        decay(self.params, self.mask, 1.0 - lr * c.weight_decay)
        for seed, gk in zip(self.seeds(0), self.grads.tolist()):
            add_noise(self.params, seed, -lr * gk / c.zo_samples, c.zo_chunk)
        out = {"lr": lr, "zo_grad": float(self.grads.mean())}
        self.end_step()
        return out

    def discard(self) -> None:
        self.end_step()

    def end_step(self) -> None:
        self.grads = None
        self.t += 1

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])


from . import zo_dist  # noqa: E402,F401  registers optim=zo_dist (a subclass, defined after MeZOPlugin)
