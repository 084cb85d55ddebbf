"""``peft.head_init=class_means`` (thinwire/optim/head_init.py) against the Bayes log-odds of
Gaussian classes, on data without signal, across ranks, and its one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_ranks
from thinwire.errors import ConfigError
from thinwire.optim.head_init import class_means_head


class Probe(nn.Module):
    """A classifier whose features are its input: the head sees ``x`` itself."""
    new_modules = ("head",)

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward(self, x, y):
        return F.cross_entropy(self.head(x), y)


def gaussians(n: int, means: torch.Tensor, priors: list[float], sigma: float, seed: int):
    """n examples of classes with the given priors, x ~ N(means[y], sigma^2 I)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(priors), n, replacement=True, generator=gen)
    return means[y] + sigma * torch.randn(n, means.shape[1], generator=gen), y


def test_class_means_head_is_the_bayes_classifier_of_isotropic_gaussians():
    """Classes N(mu_c, sigma^2 I) with priors pi_c: the posterior's logits are
    mu_c . x / sigma^2 - |mu_c|^2 / (2 sigma^2) + log pi_c (up to a common term). The head set
    from 30,000 examples gives the same logit differences, to the estimation error."""
    means = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0, 0, 0]])
    priors, sigma = [0.5, 0.3, 0.2], 1.5
    x, y = gaussians(30000, means, priors, sigma, seed=0)
    model = Probe(6, 3)
    s = class_means_head(model, [{"x": x[:15000], "y": y[:15000]}, {"x": x[15000:], "y": y[15000:]}], 3)
    assert s == pytest.approx(1 / sigma**2, rel=0.05)
    w_true = means / sigma**2
    b_true = -(means**2).sum(1) / (2 * sigma**2) + torch.log(torch.tensor(priors))
    w, b = model.head.weight.detach(), model.head.bias.detach()
    # logits are defined up to a term common to every class: compare differences to class 0
    assert torch.allclose(w[1:] - w[:1], w_true[1:] - w_true[:1], atol=0.04), (w, w_true)
    assert torch.allclose(b[1:] - b[:1], b_true[1:] - b_true[:1], atol=0.04), (b, b_true)


def test_class_means_head_on_labels_without_signal_stays_near_the_prior():
    """Labels independent of x, few examples in many dimensions: the class means differ by noise
    alone. Without the correction the temperature makes the head confidently wrong on new data
    (loss well above ln 2); with it the head stays near the prior (loss about ln 2)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(160, 64, generator=gen), torch.randint(0, 2, (160,), generator=gen)
    xt, yt = torch.randn(4000, 64, generator=gen), torch.randint(0, 2, (4000,), generator=gen)
    losses = {}
    for correct in (True, False):
        model = Probe(64, 2)
        class_means_head(model, [{"x": x, "y": y}], 2, correct_noise=correct)
        with torch.no_grad():
            losses[correct] = float(model(xt, yt))
    assert losses[True] < math.log(2) + 0.01, losses
    assert losses[False] > math.log(2) + 0.05, losses


def _two_ranks(rank: int, world_size: int, x, y):
    model = Probe(x.shape[1], 2)
    half = len(y) // 2
    sl = slice(rank * half, (rank + 1) * half)
    class_means_head(model, [{"x": x[sl], "y": y[sl]}], 2)
    return model.head.weight.detach().clone(), model.head.bias.detach().clone()


def test_class_means_head_on_two_ranks_equals_one_process_over_both_shards(tmp_path):
    """Each rank sees half of the examples; both end with the same head, which is the one a
    single process computes from all of them."""
    means = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.5, 0.0]])
    x, y = gaussians(2000, means, [0.6, 0.4], 1.0, seed=1)
    (w0, b0), (w1, b1) = run_ranks(_two_ranks, 2, tmp_path, x, y)
    assert torch.equal(w0, w1) and torch.equal(b0, b1)
    model = Probe(4, 2)
    class_means_head(model, [{"x": x, "y": y}], 2)
    assert torch.allclose(w0, model.head.weight.detach(), atol=1e-6)
    assert torch.allclose(b0, model.head.bias.detach(), atol=1e-6)


def test_head_init_errors_name_the_key(capsys):
    from conftest import cli_error

    code, err = cli_error(capsys, "experiment=tiny", "peft.head_init=zeros")
    assert code == 2 and err.endswith("peft.head_init=zeros: expected one of random, class_means"), err
    code, err = cli_error(capsys, "experiment=tiny", "peft.head_init_batches=0")
    assert code == 2 and "peft.head_init_batches=0: must be positive" in err, err

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(4, 2)

        def forward(self, x, y):
            return F.cross_entropy(self.out(x), y)

    with pytest.raises(ConfigError, match=r"^peft.head_init=class_means: needs a classifier whose new_modules"):
        class_means_head(NoHead(), [{"x": torch.zeros(2, 4), "y": torch.zeros(2, dtype=torch.long)}], 2)
    with pytest.raises(ConfigError, match=r"^peft.head_init=class_means: the batches hold no labels"):
        class_means_head(Probe(4, 2), [{"x": torch.zeros(2, 4)}], 2)


@pytest.mark.extended  # a pretrained MiniLM, three runs: ~11 s
@pytest.mark.slow
def test_resumed_minilm_mezo_equals_the_uninterrupted_run(pools, tmp_path):
    """``minilm_mezo`` (MeZO-LoRA from a class-means head, 2 ranks) resumed from its step-2
    checkpoint ends bitwise where the uninterrupted run ends: on resume the head is set from the
    class means again, then replaced by the checkpoint's."""
    import json

    args = ["experiment=minilm_mezo", "data.batch_size=4", "data.eval_batches=2", "peft.head_init_batches=2",
            "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=4", "trainer.progress=false",
            "logger=none"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    pools.train(*args, f"hydra.run.dir={full}")
    p = pools.train(*args, f"hydra.run.dir={resumed}", f"trainer.resume={full / 'checkpoints' / 'step_00000002'}")
    assert "at step 2" in p.stdout

    def rows(d):
        return [(r["step"], r["loss"], r.get("val_loss"), r.get("zo_grad")) for r in map(json.loads, open(d / "metrics.jsonl"))]

    assert [r for r in rows(full) if r[0] > 2] == rows(resumed) and len(rows(resumed)) == 2
    a, b = (torch.load(d / "checkpoints" / "step_00000004" / "common.pt", weights_only=False)["model"]
            for d in (full, resumed))
    assert a.keys() == b.keys() and any("head" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
