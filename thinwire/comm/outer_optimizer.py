"""The outer optimizer of the outer loop (``thinwire.comm.local``): any torch optimizer on the anchor, fed the
averaged pseudo-gradient after clipping (:class:`OuterOptimizer`; the equations are in its
docstring). ``sync.outer_optim`` names it as ``_target_`` + keyword arguments, as torchft's
``DiLoCo`` takes the outer optimizer from the user (torchft ``torchft/local_sgd.py``).
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

from ..errors import ConfigError, need
from .param_space import global_norm


def default_outer_optim(momentum: float = 0.0, nesterov: bool = False, lr: float = 1.0) -> dict:
    """The spec of outer SGD with these settings (lr 1, no momentum: parameter averaging)."""
    return {"_target_": "torch.optim.SGD", "lr": lr, "momentum": momentum, "nesterov": nesterov}


# sync=diloco's outer lr when ``sync.outer_optim.lr`` is null: {replicas: {H: lr}} for SGD with Nesterov momentum
# 0.9, searched as Charles et al. 2025 do (arXiv 2503.09799, Sec. 3, Figs. 7-8: the best outer lr rises with H and
# with the replica count), the best measured on the quality harness's 0.8M char-GPT, 1200 steps (docs/quality.md
# "Tuned DiLoCo"; bench/results/quality/diloco_grid.md, diloco_seeds.md, diloco_m2.md, diloco_m1.md). 4 replicas:
# of {0.1, 0.2, 0.4, 0.7} at H=8, {0.2, 0.4, 0.6, 0.7} at H=15, {0.4, 0.6, 0.7, 0.8, 1.0} at H=30 on seed 0; on
# seeds 0-2 -0.32%, -1.35%, -0.51% vs plain averaging. 2 replicas, seed 0: of {0.1, 0.2, 0.4} at H=8, {0.2, 0.4}
# at H=15, {0.4, 0.6, 0.8} at H=30. 1 replica: H=30 only, of {0.2, 0.4, 0.6}. Between measured points the lr is
# linear in log H and log replicas, outside them the nearest measured point's (docs/sync.md "DiLoCo's outer lr")
DILOCO_OUTER_LR = {4: {8: 0.4, 15: 0.4, 30: 0.8}, 2: {8: 0.2, 15: 0.4, 30: 0.6}, 1: {30: 0.4}}
DILOCO_MOMENTUM = 0.9


def _interp(points: dict, x: float) -> float:
    """The value at ``x`` of ``points`` ({x: y}), linear in log x between them, clamped outside."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, v in enumerate(xs) if v >= x)
    x0, x1 = xs[hi - 1], xs[hi]
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return points[x0] + t * (points[x1] - points[x0])


def tuned_outer_lr(local_steps: int, replicas: int) -> float:
    """DiLoCo's outer lr (SGD, Nesterov 0.9) for H = ``local_steps`` and ``replicas`` replicas, from
    :data:`DILOCO_OUTER_LR` (interpolated; rounded to 3 decimals)."""
    need(local_steps >= 1, "local_steps", local_steps, "must be >= 1")
    need(replicas >= 1, "replicas", replicas, "must be >= 1")
    per_m = {m: _interp(by_h, local_steps) for m, by_h in DILOCO_OUTER_LR.items()}
    return round(_interp(per_m, replicas), 3)


def outer_spec(spec, local_steps: int, replicas: int) -> tuple[dict, bool]:
    """``spec`` (``sync.outer_optim``) as a plain dict with a null ``lr`` replaced by
    :func:`tuned_outer_lr` for (``local_steps``, ``replicas``), and whether it was: the table
    holds DiLoCo's outer SGD with Nesterov momentum 0.9 only, so a null lr with another
    optimizer is a ConfigError naming ``outer_optim.lr``."""
    spec = dict(spec)
    if "lr" not in spec or spec["lr"] is not None:
        return spec, False
    diloco = (spec.get("_target_") == "torch.optim.SGD" and spec.get("momentum") == DILOCO_MOMENTUM
              and spec.get("nesterov") is True)
    need(diloco, "outer_optim.lr", None,
         "null takes DiLoCo's tuned outer lr, which is for torch.optim.SGD with momentum 0.9 and nesterov=true "
         f"(got {spec}); give the lr")
    return {**spec, "lr": tuned_outer_lr(local_steps, replicas)}, True


def build_outer_optimizer(params: list[torch.Tensor], spec) -> torch.optim.Optimizer:
    """The torch optimizer ``spec`` (``{"_target_": "torch.optim.SGD", "lr": 0.7, ...}``)
    over ``params``; a bad target or argument raises ConfigError naming ``outer_optim``."""
    from hydra.utils import get_class

    spec = dict(spec)
    target = spec.pop("_target_", None)
    need(target is not None, "outer_optim._target_", target, "name a torch optimizer class, e.g. torch.optim.SGD")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"outer_optim._target_={target}: not an importable class") from None
    need(isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), "outer_optim._target_", target,
         "must be a torch.optim.Optimizer subclass")
    try:
        return cls(params, **spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"outer_optim={dict(spec, _target_=target)}: {e}") from None


class Placement:
    """Where the outer loop keeps its state between outer steps (``sync.anchor_device``) and
    where it computes (``work``: the model's device, where the space's tensors live).

    ``home`` holds the anchor, the outer optimizer's per-element state (SGD's momentum, Adam's
    moments), CO2's last anchor move and eager's start; ``None`` = ``work`` (nothing moves).
    Host memory is pinned when ``work`` is CUDA, as torchft's DiLoCo keeps its copy of the
    parameters (meta-pytorch/torchft ``torchft/local_sgd.py``: ``original_parameters`` on a
    backup device, pinned). Every computation runs on ``work``: the outer step stages anchor
    and state in and copies them back (:meth:`OuterOptimizer.step`), norms are taken of work
    copies, so results are bitwise those of the default placement. With ``home`` given, the
    state is always a separate copy, also when ``home`` is ``work``'s device (CPU runs)."""

    def __init__(self, work, home: str | None = None):
        self.work = torch.device(work)
        self.home = self.work if home is None else torch.device(home)
        self.staged = home is not None
        self.pin = self.home.type == "cpu" and self.work.type == "cuda"

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` kept at home: a (pinned) copy, or ``t`` itself when not staged or already there."""
        if not self.staged or (t.device == self.home and (not self.pin or t.is_pinned())):
            return t
        out = torch.empty(t.shape, dtype=t.dtype, device=self.home, pin_memory=self.pin)
        return out.copy_(t)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the work device: a copy when staged, ``t`` itself otherwise."""
        return t.to(self.work, copy=True) if self.staged else t

    def nbytes(self, tensors) -> int:
        """Bytes of ``tensors`` held at home (0 when not staged): ``anchor_device_bytes``."""
        return sum(t.numel() * t.element_size() for t in tensors if self.staged and t.device == self.home)


def per_element(p: torch.Tensor, key: str, value) -> bool:
    """Is optimizer state ``key`` of ``p`` per element (staged with the anchor)? Scalars such as
    Adam's ``step`` stay where the optimizer put them, as under the default placement."""
    return torch.is_tensor(value) and key != "step" and value.shape == p.shape


class OuterOptimizer:
    """The outer step on the anchor ``a`` (one fp32 tensor per piece of the space)::

        u_t = clip(d_t)                   (norm clip by default, or per element)
        a_{t+1} = Opt(a_t, grad = u_t)    (any torch optimizer; default torch.optim.SGD)

    With SGD this is the CO2 paper's outer momentum (Eq. 3): m_t = beta m_{t-1} + u_t,
    a_{t+1} = a_t - alpha (u_t + beta m_t) with Nesterov, a_t - alpha m_t without, and
    DiLoCo's outer optimizer (Douillard et al. 2023: SGD, Nesterov 0.9, lr 0.7); torchft's
    ``DiLoCo`` likewise takes the outer optimizer from the user. CO2's staleness penalty
    (``staleness_penalty``) and clipping are pre-steps on d_t, so they compose with any
    optimizer. CO2's "outer momentum clipping": the public reference computes an element-wise
    ``torch.clamp`` and discards the result (a no-op); here the clip is applied: by default
    the global L2 norm of ``d_t`` is scaled down to ``clip`` when larger (``clip_mode=norm``),
    or each element is clamped to ``[-clip, clip]`` (``clip_mode=value``).

    ``step`` returns the move a_{t+1} - a_t that the optimizer made (CO2 adds it to the
    live parameters). With the shipped SGD settings (lr 1) the anchor is bit-for-bit what
    the hand-written outer SGD of earlier versions computed.
    """

    def __init__(self, params: list[torch.Tensor], cfg, norm=None, spec=None, place: Placement | None = None):
        self.norm = norm or global_norm  # the global L2 norm (a sharded space reduces it over its group)
        self.place = place  # where params and state live between steps (None: where they are)
        self.clip, self.clip_mode = cfg.clip, cfg.clip_mode
        self.params = params
        # spec: cfg.outer_optim with its lr resolved (outer_spec), when the caller knows H and the replicas
        self.optimizer = build_outer_optimizer(params, cfg.outer_optim if spec is None else spec)
        self.clipped = 0

    def clip_(self, d: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.clip_mode == "value":
            self.clipped += 1 if any(bool((x.abs() > self.clip).any()) for x in d) else 0
            return [x.clamp_(-self.clip, self.clip) for x in d]
        norm = self.norm(d)
        if norm > self.clip:
            self.clipped += 1
            scale = self.clip / (norm + 1e-12)
            for x in d:
                x.mul_(scale)
        return d

    @contextlib.contextmanager
    def _on_work(self, params: list[torch.Tensor]):
        """``params`` and their per-element state on the work device for the duration, then
        copied back into their home tensors (``Placement``; nothing moves when not staged)."""
        place = self.place
        if place is None or not place.staged:
            yield
            return
        homes = [p.data for p in params]
        moved = {}
        for p in params:
            p.data = place.fetch(p.data)
            st = self.optimizer.state.get(p, {})
            for k, v in st.items():
                if per_element(p, k, v):
                    moved[id(p), k], st[k] = v, place.fetch(v)
        try:
            yield
        finally:
            for p, home in zip(params, homes):
                p.data = home.copy_(p.data)
                st = self.optimizer.state.get(p, {})
                for k, v in st.items():
                    if per_element(p, k, v):  # back into its home tensor; new state (first step) stored
                        old = moved.get((id(p), k))
                        st[k] = old.copy_(v) if old is not None else place.store(v)

    def rehome(self) -> None:
        """Every per-element state tensor at home (after a load or a trial replaced them)."""
        if self.place is not None:
            for p, st in self.optimizer.state.items():
                for k, v in st.items():
                    if per_element(p, k, v):
                        st[k] = self.place.store(v)

    @torch.no_grad()
    def step(self, anchor: list[torch.Tensor], d: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update ``anchor`` (the tensors this optimizer was built on) in place with the
        pseudo-gradient ``d``; returns the applied step (a_{t+1} - a_t) per tensor, on the
        work device."""
        with self._on_work(anchor):
            before = [a.clone() for a in anchor]
            for a, g in zip(anchor, self.clip_(d)):
                a.grad = g
            self.optimizer.step()
            for a in anchor:
                a.grad = None
            return [a - b for a, b in zip(anchor, before)]

    @torch.no_grad()
    def trial(self, d: list[torch.Tensor], params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Where ``step`` with ``d`` would move ``params`` (default: the whole anchor), as
        fresh tensors; the anchor, the optimizer's state and the clip counter are left as they
        were (eager updates' per-rank step from the consensus)."""
        params = self.params if params is None else params
        before = [a.clone() for a in params]
        saved = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()}
                 for p, st in self.optimizer.state.items()}
        clipped = self.clipped
        self.step(params, d)
        moved = [a.clone() for a in params]
        for a, b in zip(params, before):
            a.copy_(b)
        self.optimizer.state.clear()
        self.optimizer.state.update(saved)
        self.rehome()
        self.clipped = clipped
        return moved

    def momentum(self) -> list[torch.Tensor]:
        """The optimizer's first-moment buffers (SGD's ``momentum_buffer``, Adam's ``exp_avg``)."""
        out = []
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            buf = st.get("momentum_buffer", st.get("exp_avg"))
            out.append(buf if buf is not None else torch.zeros_like(p))
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "clipped": self.clipped}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # moved to the anchor's device by torch
        self.rehome()
        self.clipped = state["clipped"]
