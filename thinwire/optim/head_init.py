"""A classifier's new head set from the class means of its input features
(``peft.head_init=class_means``): forward passes only, so a zeroth-order run starts from a
head that already separates the classes.

Why: MeZO (Malladi et al. 2023) fine-tunes from a good starting point, a prompt whose
verbaliser words already score the classes; it does not train a random head in a useful
number of steps. Its expected update is ``lr * grad``, so at full fine-tuning's lr
(1e-6..1e-5) a random head moves ~lr per step, and a larger lr is ruled out by the noise
of perturbing every parameter (measured on MiniLM: docs/presets.md, "minilm_mezo"). A
nearest-class-mean head (weight imprinting, Qi et al. 2018; Mensink et al. 2013) is that
starting point for a model with a linear head, computed from forward passes alone.

With x the head's input (what ``head`` receives, the pooled features), on N training
examples of C classes (n_c of class c, pi_c = n_c / N), summed over every rank::

    mu_c = mean of x over class c,   mubar = sum_c pi_c mu_c,   D_c = mu_c - mubar
    S_w  = pooled within-class covariance of x
    logit_c(x) = s D_c . x - s D_c . (mu_c + mubar) / 2 + log pi_c        (head = s D, bias)

the nearest-class-mean rule (logit_c = -s |x - mu_c|^2 / 2 + log pi_c, up to terms common
to every class). The temperature ``s`` is the ratio of the between-class spread to the
within-class variance along the same directions, which for C = 2 is exactly the
log-odds of Fisher's 1-D discriminant on the projection w . x, w = mu_1 - mu_0::

    s = (sum_c pi_c |D_c|^2 - tr(S_w) sum_c pi_c (1 - pi_c) / n_c) / sum_c pi_c D_c^T S_w D_c

The subtracted term is the expected part of |D_c|^2 that comes from estimating the means
(the variance of mu_c - mubar is tr(S_w) (1 - pi_c) / n_c): without it, s is overestimated
on few examples and the head is confidently wrong (measured on MiniLM's features with 256
lines: val loss 0.72-0.84 without the correction, 0.67-0.69 with it; it tends to s = 0, the
prior alone, when the means are all noise). Classes absent from the sample keep a zero row.

Data parallel: each rank runs its batches (drawn at steps -1, -2, ..., not the first
training batches, as LoRA-GA's estimate does) and keeps its features (n x hidden floats);
per-class counts and sums are all-reduced, then the C within-class variances along D and
tr(S_w) (C + 1 numbers), both charged as setup traffic. Every rank computes the same head
from the same reduced numbers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..comm import accounting
from ..errors import ConfigError

HEAD_INITS = ("random", "class_means")


def new_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """The model's one new linear head (``new_modules``) with ``num_classes`` outputs."""
    names = list(getattr(model, "new_modules", ()))
    heads = [m for n, m in model.named_modules() if n and n.split(".")[-1] in names and isinstance(m, nn.Linear)]
    if len(heads) != 1 or heads[0].out_features != num_classes or heads[0].bias is None:
        found = ", ".join(f"{type(m).__name__}({getattr(m, 'out_features', '?')})" for m in heads) or "none"
        raise ConfigError(f"peft.head_init=class_means: needs a classifier whose new_modules name one nn.Linear "
                          f"head with {num_classes} outputs and a bias ({type(model).__name__}: {found})")
    return heads[0]


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Linear, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): the head's inputs and the labels over ``batches`` (dicts with ``y``), eval mode."""
    xs, ys = [], []
    hook = head.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach().reshape(-1, head.in_features)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if "y" not in batch:
                raise ConfigError("peft.head_init=class_means: the batches hold no labels (y)")
            model(**batch)
            ys.append(batch["y"].reshape(-1))
            seen, labels = sum(len(t) for t in xs), sum(len(t) for t in ys)
            if seen != labels:
                raise ConfigError(f"peft.head_init=class_means: needs one head input per label (a sequence "
                                  f"classifier); the head saw {seen} inputs for {labels} labels")
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(xs).double(), torch.cat(ys)


@torch.no_grad()
def class_means_head(model: nn.Module, batches, num_classes: int, *, process_group=None,
                     meter: accounting.WireMeter | None = None, correct_noise: bool = True) -> float:
    """Set the model's new head from class means (module docstring), in place, on every rank
    alike; returns the temperature ``s``. ``correct_noise=False`` leaves out the correction of
    ``s`` for noisy means (for bench/minilm_mezo.py's comparison)."""
    head = new_head(model, num_classes)
    x, y = head_features(model, head, batches)
    meter = meter if meter is not None else accounting.WireMeter()
    p = accounting.group_size(process_group)
    C = num_classes
    sums = torch.cat([torch.bincount(y, minlength=C).double()[:, None], torch.zeros(C, x.shape[1], dtype=x.dtype,
                      device=x.device).index_add_(0, y, x)], dim=1)
    if p > 1:
        accounting.all_reduce(meter, sums, group=process_group, kind="setup")
    n, total = sums[:, 0], sums[:, 1:]
    seen = n > 0
    mu = total / n.clamp_min(1)[:, None]
    pi = n / n.sum()
    mubar = pi @ mu
    D = torch.where(seen[:, None], mu - mubar, torch.zeros_like(mu))
    r = x - mu[y]                                 # within-class residuals of this rank's examples
    spread = torch.cat([(r @ D.T).pow(2).sum(0), r.pow(2).sum().reshape(1)])
    if p > 1:
        accounting.all_reduce(meter, spread, group=process_group, kind="setup")
    dof = max(float(n.sum()) - int(seen.sum()), 1.0)
    var_along_d, tr_sw = spread[:C] / dof, float(spread[C]) / dof
    between = float((pi * D.pow(2).sum(1)).sum())
    noise = tr_sw * float((pi * (1 - pi) / n.clamp_min(1))[seen].sum()) if correct_noise else 0.0
    within = float((pi * var_along_d).sum())
    s = max(between - noise, 0.0) / within if within > 0 else 0.0
    prior = torch.log((n + 1) / (n.sum() + C))    # add-one: a class absent from the sample is not -inf
    weight = s * D
    bias = -s * (D * (mu + mubar)).sum(1) / 2 + prior
    head.weight.copy_(weight.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))
    return s
