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
import torch.distributed as dist

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
def add_noise(params: list[torch.Tensor], seed: int, scale, chunk: int) -> None:
    """theta += scale * z(seed), z regenerated chunk by chunk (no parameter-sized temporaries);
    ``scale``: one number, or one per parameter (per-group learning rates)."""
    scales = scale if isinstance(scale, (list, tuple)) else [scale] * len(params)
    gen = None
    for i, (p, a) in enumerate(zip(params, scales)):
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device)
        gen.manual_seed((seed + 0x9E3779B97F4A7C15 * (i + 1)) & MASK64)
        for view in _chunks(p, chunk):
            z = torch.randn(view.shape, generator=gen, device=p.device, dtype=p.dtype)
            view.add_(z, alpha=a)


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
def spsa_cycle(params, seed: int, eps: float, chunk: int, closure=None):
    """+eps z, evaluate ``closure()``, -2 eps z, evaluate, +eps z. With ``closure=None`` only
    the parameter arithmetic is replayed (zo_dist: every rank replays every rank's cycle, so
    the rounding left by the restore is the same on all ranks and they stay bitwise equal).
    Returns (l+, l-) or None."""
    add_noise(params, seed, eps, chunk)
    lp = closure() if closure is not None else None
    add_noise(params, seed, -2 * eps, chunk)
    lm = closure() if closure is not None else None
    add_noise(params, seed, eps, chunk)
    return None if closure is None else (lp, lm)


def perturbation_cycle(model, params, seed: int, eps: float, chunk: int, micro: list[dict] | None):
    """:func:`spsa_cycle` with the mean loss of ``model`` over the micro-batches ``micro``."""
    return spsa_cycle(params, seed, eps, chunk, None if micro is None else lambda: mean_loss(model, micro))


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


def rank_and_size(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class MeZO(torch.optim.Optimizer):
    """MeZO as a ``torch.optim.Optimizer`` (the module docstring's update; Malladi et al. 2023,
    Algorithm 1): ``loss = opt.step(closure)`` with a closure that returns the loss on this
    step's batch, forward only (it is called 2 ``samples`` times, under ``torch.no_grad``;
    put the model in eval mode first if it has dropout, as the reference does).

    Per parameter group: ``lr`` and ``weight_decay`` (decoupled, theta *= 1 - lr wd before
    the step), so torch LR schedulers drive it. Memory: the parameters, one chunk of
    ``chunk`` elements of z, and the closure's activations, as in inference. On several
    ranks (``process_group``, default: the default group when initialised) every rank
    perturbs along the same z and the projected gradients are all-reduced (4 bytes per
    sample; the loss for logging as 2 more), so ranks stay identical: pass each rank its
    own batch. State (``state_dict``): the step counter that seeds z, identical on every rank.
    A non-finite projected gradient (on any rank) skips the update on every rank.
    """

    def __init__(self, params, lr: float = 1e-6, *, weight_decay: float = 0.0, eps: float = 1e-3,
                 samples: int = 1, chunk: int = 1 << 20, seed: int = 0, process_group=None,
                 meter: accounting.WireMeter | None = None):
        need(lr >= 0, "lr", lr, "must be >= 0")
        need(eps > 0, "eps", eps, "must be positive")
        need(samples >= 1, "samples", samples, "must be >= 1")
        need(chunk >= 1, "chunk", chunk, "must be >= 1")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps, self.samples, self.chunk, self.seed = eps, int(samples), int(chunk), int(seed)
        self.process_group = process_group
        self.meter = meter if meter is not None else accounting.WireMeter()
        self.t = 0                                # perturbation counter: seeds are zo_seed(seed, t, k, rank)
        self.grads: torch.Tensor | None = None    # this step's projected gradients, one per sample
        self.loss_mean = float("nan")             # this step's loss, averaged over ranks

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def seeds(self, rank: int = 0) -> list[int]:
        return [zo_seed(self.seed, self.t, k, rank) for k in range(self.samples)]

    @torch.no_grad()
    def estimate(self, closure) -> torch.Tensor:
        """Run the perturbation cycles; sets ``grads`` (mean over ranks) and ``loss_mean``;
        returns this rank's loss (mean of l+ and l-). Parameters are left as they were."""
        g, losses = [], []
        for seed in self.seeds(0):
            lp, lm = spsa_cycle(self.params, seed, self.eps, self.chunk, closure)
            g.append((lp - lm) / (2 * self.eps))
            losses.append((lp + lm) / 2)
        loss = torch.stack(losses).mean()
        self.grads, self.loss_mean = self.exchange(torch.stack(g).float(), loss)
        return loss

    def exchange(self, g: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean projected gradient (fp32, one per sample) and mean loss (fp16) over ranks."""
        _, p = rank_and_size(self.process_group)
        if p == 1:
            return g, float(loss)
        accounting.all_reduce(self.meter, g, group=self.process_group, kind="data")
        packed = loss.detach().to(torch.float16).reshape(1)
        accounting.all_reduce(self.meter, packed, group=self.process_group, kind="data")
        return g / p, float(packed.float()) / p

    def finite(self) -> bool:
        """Whether this step's (rank-averaged) projected gradients are finite."""
        return self.grads is not None and bool(torch.isfinite(self.grads).all())

    @torch.no_grad()
    def decay(self) -> None:
        for group in self.param_groups:
            decay(group["params"], [True] * len(group["params"]), 1.0 - group["lr"] * group["weight_decay"])

    def scales(self, coeff: float, divisor: int) -> list[float]:
        """-lr * coeff / divisor per parameter, with its group's lr."""
        return [-g["lr"] * coeff / divisor for g in self.param_groups for _ in g["params"]]

    @torch.no_grad()
    def update(self) -> None:
        """theta -= lr (g z + wd theta) for this step's estimate; then the next step's seeds."""
        self.decay()
        for seed, gk in zip(self.seeds(0), self.grads.tolist()):
            add_noise(self.params, seed, self.scales(gk, self.samples), self.chunk)
        self.end_step()

    def end_step(self) -> None:
        self.grads = None
        self.t += 1

    def step(self, closure=None) -> torch.Tensor:
        need(closure is not None, "closure", closure, "MeZO.step needs a closure returning the loss (forward only)")
        loss = self.estimate(closure)
        if self.finite():
            self.update()
        else:
            self.end_step()
        return loss

    def zo_state(self) -> dict:
        return {"t": self.t}

    def load_zo_state(self, state: dict) -> None:
        self.t = int(state["t"])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "zo": self.zo_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.load_zo_state(state_dict.pop("zo"))
        super().load_state_dict(state_dict)


def ordered_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Parameter groups in model order (runs of parameters with the same decay), so z's
    per-parameter seeds follow the model's parameter order; decay only on >= 2-D parameters."""
    groups: list[dict] = []
    for (_, p), m in zip(named, decay_mask(named)):
        wd = weight_decay if m else 0.0
        if groups and groups[-1]["weight_decay"] == wd:
            groups[-1]["params"].append(p)
        else:
            groups.append({"params": [p], "weight_decay": wd})
    return groups


@OPTIMIZERS.register("mezo")
class MeZOPlugin(OptimizerPlugin):
    """ZO-SGD in place: the trainer's driver of :class:`MeZO` (the optimizer a user loop
    steps itself). ``compute`` runs the perturbation cycles in eval mode on the rank's
    micro-batches (the loss it returns is the mean of l+ and l-), ``apply`` sets this step's
    learning rate and updates; state = the step counter (seeds are a function of it),
    identical on every rank."""

    Config = MeZOOptions
    needs_backprop = False

    @classmethod
    def check_run(cls, cfg) -> None:
        need(cfg.data.batch_size % cfg.optim.zo_accum == 0, "optim.zo_accum", cfg.optim.zo_accum,
             f"must divide data.batch_size={cfg.data.batch_size}")

    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        named = self.trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.meter = self.meter if self.meter is not None else accounting.WireMeter()
        self.optimizer = self.make_optimizer(ordered_groups(named, cfg.weight_decay))

    def make_optimizer(self, groups) -> MeZO:
        c = self.cfg
        return MeZO(groups, lr=c.lr, eps=c.zo_eps, samples=c.zo_samples, chunk=c.zo_chunk, seed=c.zo_seed,
                    meter=self.meter)

    @property
    def grads(self) -> torch.Tensor | None:
        return self.optimizer.grads

    @property
    def t(self) -> int:
        return self.optimizer.t

    # -- one step --------------------------------------------------------------------
    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        micro = split_batch(batch, self.cfg.zo_accum)
        was_training = forward_model.training
        forward_model.eval()
        loss = self.optimizer.estimate(lambda: mean_loss(forward_model, micro))
        forward_model.train(was_training)
        return loss

    def local_finite(self) -> bool:
        return self.optimizer.finite()

    def agreement(self) -> tuple[float, bool]:
        """(mean loss over ranks, every rank finite) of this step, already agreed by the
        exchange in ``compute``: a trainer can use it instead of its own control packet."""
        return self.optimizer.loss_mean, self.local_finite()

    def apply(self, step: int) -> dict[str, float]:
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = {"lr": lr, "zo_grad": float(self.grads.mean())}
        self.optimizer.update()
        return out

    def discard(self) -> None:
        self.optimizer.end_step()

    def state_dict(self) -> dict:
        return self.optimizer.zo_state()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_zo_state(state)

