"""LoRA and LoRA-GA adapters through PEFT (``peft=lora``, ``peft=lora_ga``).

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model keeps
thinwire's ``loss = model(**batch)`` contract and its state_dict holds the base weights
and the adapters: a checkpoint restores both.

LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation", Algorithm 1) initialises each adapter from the full-weight gradient
G = mean over batches of dL/dW (shape d_out x d_in)::

    U, S, V = svd_lowrank(G, q=min(4r, min(G.shape)), niter=4)       G ~ U diag(S) V^T
    A0 = c * V[:, :r]^T,  B0 = c * U[:, r:2r]                         direction "ArB2r" (Sec. 3.2)
    c  = d_out**(1/4) / sqrt(gamma)                                   "stable" scale (Sec. 3.3)
    W0 <- W0 - s * B0 @ A0,   s = alpha / r (alpha / sqrt(r) with rsLoRA)

so that W0 + s B0 A0 is the pretrained weight (output unchanged at step 0) while the
first step's change of B A, -lr s^2 (B0 B0^T G + G A0^T A0), is the projection of G on
its leading singular directions: aligned with full fine-tuning's first step.
``peft.ga_init=paper`` (default) does exactly that, as the authors' reference code
does. ``peft.ga_init=peft`` uses PEFT 0.21's own ``init_lora_weights="lora_ga"``,
which differs: it multiplies B0 by diag(S[r:2r]) and applies the stable factor to B0
only, so B0 (hence the B0 B0^T G term) scales with the gradient's magnitude.

Data-parallel estimate: each rank accumulates G on ``peft.ga_batches`` of its own
batches with PEFT's ``preprocess_loraga`` (gradients only for the adapted weights:
memory = one gradient per adapted weight, no flattened copy), then the per-rank means
are averaged with one all-reduce per layer, in module order, charged as setup traffic:
every rank gets the same G, hence the same SVD (run with a fixed seed, outside the
global RNG stream) and the same modified base weights.

The modified base weights are part of ``model.state_dict()``, which is what the
trainer checkpoints; on resume the estimate is recomputed (the same collective
sequence on every rank) and then overwritten by the checkpoint, base weights included.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..comm import accounting
from ..errors import need, one_of, positive
from .peft import PEFT_METHODS, setup_batches

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
GA_INITS = ("paper", "peft")


@dataclass
class LoraOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)    # empty: every nn.Linear except `head`
    modules_to_train: list[str] = field(default_factory=list)  # fully trained too (e.g. a new head)
    use_rslora: bool = False         # scaling alpha/sqrt(r) instead of alpha/r

    def check(self) -> None:
        positive(self, "r", "alpha")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")


@dataclass
class LoraGAOptions(LoraOptions):
    ga_batches: int = 4              # gradient-estimation batches per rank
    ga_direction: str = "ArB2r"      # ArB2r | A2rBr | ArBr | random
    ga_scale: str = "stable"         # stable | weight_svd | gd_scale | unit
    ga_gamma: int = 16               # gamma of the stable scaling
    ga_init: str = "paper"           # paper (authors' reference) | peft (PEFT 0.21's variant)

    def check(self) -> None:
        super().check()
        positive(self, "ga_batches", "ga_gamma")
        one_of(self.ga_direction, DIRECTIONS, "ga_direction")
        one_of(self.ga_scale, SCALES, "ga_scale")
        one_of(self.ga_init, GA_INITS, "ga_init")
# never adapted by default: the output head (tied to the embedding in the char-GPT) and
# HF encoders' pooler, which HFClassifier's mean pooling leaves unused (DDP would then
# wait for gradients of parameters that never get one)
DEFAULT_EXCLUDE = ("head", "pooler")


def target_names(cfg, model: nn.Module) -> list[str]:
    """``peft.target_modules``, or every nn.Linear outside the head, pooler and modules_to_train."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    skip = set(DEFAULT_EXCLUDE) | set(cfg.modules_to_train)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not skip.intersection(n.split("."))]
    if not names:
        raise ValueError("peft.target_modules=[]: the model has no nn.Linear to adapt; name the modules")
    return names


def lora_config(cfg, model: nn.Module, *, ga: bool):
    from peft import LoraConfig
    from peft.tuners.lora.config import LoraGAConfig

    kw = {}
    if ga:
        kw = {"init_lora_weights": "lora_ga",
              "lora_ga_config": LoraGAConfig(direction=cfg.ga_direction, scale=cfg.ga_scale,
                                             stable_gamma=cfg.ga_gamma)}
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_names(cfg, model), use_rslora=cfg.use_rslora, **kw)


def inject(cfg, model: nn.Module, config) -> nn.Module:
    """Adapters in place; only they, ``peft.modules_to_train`` and the model's ``new_modules``
    (a classifier's freshly initialised head, which would otherwise stay frozen at random
    weights) stay trainable."""
    from peft import inject_adapter_in_model

    train = set(cfg.modules_to_train) | set(getattr(model, "new_modules", ()))
    model = inject_adapter_in_model(config, model)
    for name, module in model.named_modules():
        if name and name.split(".")[-1] in train:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


@PEFT_METHODS.register("lora")
def lora(cfg, model: nn.Module, *, data=None, world=None, meter=None) -> nn.Module:
    """Vanilla LoRA: A Kaiming-uniform (global RNG, seeded alike on every rank), B = 0."""
    return inject(cfg, model, lora_config(cfg, model, ga=False))


def estimate_gradients(model: nn.Module, config, data, n_batches: int, device) -> None:
    """PEFT's LoRA-GA estimate on this rank's batches: each target module gets
    ``_peft_loraga_grad``, the mean gradient of its weight over the batches. The batches
    are ``setup_batches`` (drawn at steps -1, -2, ...: not the first training batches)."""
    from peft.tuners.lora.loraga import preprocess_loraga

    def train_step() -> None:
        for batch in setup_batches(data, n_batches, device):
            model(**batch).backward()

    with warnings.catch_warnings():  # PEFT counts backward calls with full backward hooks; the
        warnings.simplefilter("ignore", UserWarning)  # inputs (token ids) never require grad
        preprocess_loraga(model, config, train_step)


def average_estimates(model: nn.Module, config, world, meter, group=None) -> None:
    """Mean of the per-rank estimates: one all-reduce per adapted layer, in module order.
    ``world`` None: the size of ``group`` (the default process group) when initialised."""
    from peft.tuners.lora.loraga import get_target_modules

    world_size = world.world_size if world is not None else accounting.group_size(group)
    if world_size <= 1:
        return
    meter = meter if meter is not None else accounting.WireMeter()
    for _, module in get_target_modules(model, config):
        g = getattr(module, "_peft_loraga_grad", None)
        if g is not None:  # absent on every rank alike (a module the loss does not reach)
            accounting.all_reduce(meter, g, group=group, kind="setup")
            g.div_(world_size)


def ga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, cfg, seed: int):
    """(A0, B0) of LoRA-GA from the gradient estimate (the module doc's equations), fp32.
    ``svd_lowrank`` draws a random test matrix: it gets its own seed, so the global RNG
    stream (dropout, vanilla LoRA's init) is left as it was."""
    g = grad.float()
    d_out = g.shape[0]
    devices = [g.device] if g.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        Vh = V.T
        if cfg.ga_direction == "ArB2r":
            A, B = Vh[:r], U[:, r:2 * r]
        elif cfg.ga_direction == "A2rBr":
            A, B = Vh[r:2 * r], U[:, :r]
        elif cfg.ga_direction == "ArBr":
            A, B = Vh[1:2 * r:2], U[:, 0:2 * r:2]
        else:  # random: r of the 2r leading directions for A, the other r for B
            perm = torch.randperm(2 * r, device=g.device)
            A, B = Vh[perm[:r]], U[:, perm[r:]]
        if cfg.ga_scale == "stable":
            c = d_out ** 0.25 / cfg.ga_gamma ** 0.5
        elif cfg.ga_scale == "gd_scale":
            c = 1.0 / scaling
        elif cfg.ga_scale == "weight_svd":  # the reference's "weightS": mean sqrt of W's top-r singular values
            _, Sw, _ = torch.svd_lowrank(weight.float(), q=min(4 * r, min(weight.shape)), niter=4)
            c = float(torch.sqrt(Sw[:r] / scaling).mean())
        else:  # unit: A0, B0 orthonormal as they come
            c = 1.0
    return (A * c).contiguous(), (B * c).contiguous()


@torch.no_grad()
def ga_initialise(model: nn.Module, cfg, adapter: str = "default") -> None:
    """Set every adapter from its layer's averaged estimate and move the offset into the
    frozen base weight: W0 <- W0 - s B0 A0 (computed in fp32 from the adapters as stored,
    so the forward W0 x + s B0 A0 x gives back the pretrained output)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        base = layer.get_base_layer() if isinstance(layer, LoraLayer) else None
        grad = getattr(base, "_peft_loraga_grad", None)
        if grad is None:
            continue
        r, s = layer.r[adapter], layer.scaling[adapter]
        w = base.weight
        # the layer's name as the trainer sees it (a PeftModel adds base_model.model.): same SVD seed
        A, B = ga_factors(grad, w, r, s, cfg, seed=zlib.crc32(name.removeprefix("base_model.model.").encode()))
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a.copy_(A.to(a.dtype))
        b.copy_(B.to(b.dtype))
        w.copy_((w.float() - s * (b.float() @ a.float())).to(w.dtype))
        del base._peft_loraga_grad


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch)`` for a dict batch (``model(*batch)`` for a tuple, ``model(batch)``
    otherwise); a Hugging Face output's ``.loss``, or the tensor itself."""
    out = model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, (tuple, list)) \
        else model(batch)
    return out.loss if hasattr(out, "loss") else out


def lora_ga_init(model: nn.Module, batches, *, loss_fn=None, direction: str = "ArB2r", scale: str = "stable",
                 gamma: int = 16, adapter: str = "default", process_group=None,
                 meter: accounting.WireMeter | None = None) -> nn.Module:
    """LoRA-GA initialisation (module docstring, ``ga_init=paper``) of a model that already
    holds LoRA adapters (``peft.get_peft_model`` or ``inject_adapter_in_model``), in place.

    ``batches``: this rank's gradient-estimation batches (any iterable, read once);
    ``loss_fn(model, batch)``: the loss (default :func:`default_loss`). G is estimated on
    the adapted layers' base weights (PEFT's ``preprocess_loraga``: gradients only for
    those, one buffer each), averaged over ``process_group`` (default: the default group
    when initialised; one all-reduce per layer, charged to ``meter`` as setup traffic), then
    every adapter is set from G's SVD and the base weight absorbs the offset, so the model's
    output is unchanged. Every rank must call it with the same number of adapted layers.
    Returns ``model``. Departure from the trainer before this function existed: the adapters
    are injected before the estimate (the trainer now does the same), which is exact: with
    B = 0 the adapters add exactly zero to every output and to every gradient of a base weight.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.config import LoraGAConfig

    opts = LoraGAOptions(ga_direction=direction, ga_scale=scale, ga_gamma=gamma)
    opts.check()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.r]
    need(bool(layers), "model", type(model).__name__, f"holds no LoRA adapter {adapter!r}: inject adapters first "
                                                      f"(peft.get_peft_model)")
    for name, layer in layers:
        shape, r = layer.get_base_layer().weight.shape, layer.r[adapter]
        if 2 * r > min(shape):
            raise ValueError(f"r={r}: LoRA-GA needs 2 r <= min(d_out, d_in) = {min(shape)} ({name})")
    config = LoraConfig(target_modules=[f"{n}.base_layer" for n, _ in layers], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=gamma))
    loss_fn = loss_fn or default_loss

    def train_step() -> None:
        for batch in batches:
            loss_fn(model, batch).backward()

    from peft.tuners.lora.loraga import preprocess_loraga

    with warnings.catch_warnings():  # PEFT counts backward calls with full backward hooks; the
        warnings.simplefilter("ignore", UserWarning)  # inputs (token ids) never require grad
        preprocess_loraga(model, config, train_step)
    average_estimates(model, config, None, meter, group=process_group)
    ga_initialise(model, opts, adapter)
    return model


@PEFT_METHODS.register("lora_ga")
def lora_ga(cfg, model: nn.Module, *, data=None, world=None, meter=None) -> nn.Module:
    """``peft=lora_ga``: vanilla adapters, then :func:`lora_ga_init` on ``peft.ga_batches`` of
    this rank's batches, drawn at steps -1, -2, ... (not the first training batches);
    ``ga_init=peft``: PEFT's own variant on the estimate."""
    if data is None:
        raise ValueError("peft=lora_ga: needs training data to estimate gradients")
    from peft.tuners.lora.loraga import get_target_modules

    ga_config = lora_config(cfg, model, ga=True)  # preprocess_loraga needs a LoRA-GA config
    for name, module in get_target_modules(model, ga_config):  # before the costly estimate
        shape = module.weight.shape
        if 2 * cfg.r > min(shape):
            raise ValueError(f"peft.r={cfg.r}: LoRA-GA needs 2 r <= min(d_out, d_in) = {min(shape)} ({name})")
    device = next(model.parameters()).device
    if cfg.ga_init == "peft":
        estimate_gradients(model, ga_config, data, cfg.ga_batches, device)
        average_estimates(model, ga_config, world, meter)
        return inject(cfg, model, ga_config)  # PEFT's lora_ga_init consumes the estimates
    model = inject(cfg, model, lora_config(cfg, model, ga=False))
    batches = setup_batches(data, cfg.ga_batches, device)
    return lora_ga_init(model, batches, direction=cfg.ga_direction, scale=cfg.ga_scale, gamma=cfg.ga_gamma,
                        meter=meter)


lora.Config = LoraOptions
lora_ga.Config = LoraGAOptions


def check_modules(cfg) -> None:
    """``check_run`` of ``peft=lora|lora_ga``: every name in ``peft.target_modules`` and
    ``peft.modules_to_train`` is a module of the model (a full name, or its last parts, as
    PEFT matches them). Checked where the model builder is ``meta_buildable`` (built on the
    meta device from its options in milliseconds, no weights); for other models (a pretrained
    ``hf_classifier``) the names are checked when the workers build the model."""
    from hydra.utils import get_method, instantiate

    from ..data.base import DataInfo
    from ..errors import ConfigError

    target = cfg.model.get("_target_")
    try:
        builder = get_method(target)
    except Exception:  # noqa: BLE001 - a user's builder that does not import: checked by the run
        return
    if not getattr(builder, "meta_buildable", False):
        return
    info = DataInfo(unit="samples", items_per_batch=1, vocab_size=256, num_classes=10, n_features=64)
    with torch.device("meta"):
        model = instantiate(cfg.model, info=info)
    names = [n for n, _ in model.named_modules() if n]
    for key in ("target_modules", "modules_to_train"):
        wanted = list(cfg.peft[key])
        for t in wanted:
            if not any(n == t or n.endswith("." + t) for n in names):
                leaves = sorted({n.split(".")[-1] for n in names})
                raise ConfigError(f"peft.{key}={wanted}: {t} names no module of the model; its modules "
                                  f"are named {', '.join(leaves)}")


lora.check_run = check_modules
lora_ga.check_run = check_modules


lora.requires = lora_ga.requires = {"peft": "pip install 'thinwire[hf]'"}  # checked before any worker starts
