"""Small classifiers for scikit-learn's 8x8 digits: an MLP or a two-layer CNN."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import one_of, positive


class DigitsNet(nn.Module):
    def __init__(self, n_features: int, n_classes: int, arch: str, hidden: int):
        super().__init__()
        self.arch = arch
        if arch == "mlp":
            self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU())
        elif arch == "cnn":
            side = int(round(n_features ** 0.5))
            if side * side != n_features:
                raise ValueError(f"model.arch=cnn needs square images, got {n_features} features")
            self.body = nn.Sequential(
                nn.Unflatten(1, (1, side, side)),
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                nn.Flatten(), nn.Linear(128, hidden), nn.ReLU())
        else:
            raise ValueError(f"model.arch={arch!r}: expected 'mlp' or 'cnn'")
        self.head = nn.Linear(hidden, n_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y)


def build_digits_net(arch: str = "mlp", hidden: int = 128, *, info) -> DigitsNet:
    """Hydra ``_target_`` of ``model=mlp_digits``: ``arch`` mlp | cnn, ``hidden`` units."""
    return DigitsNet(info.n_features, info.num_classes, arch, hidden)


def _check_digits_options(o) -> None:
    positive(o, "hidden")
    one_of(o.arch, ("mlp", "cnn"), "arch")


build_digits_net.check_options = _check_digits_options
build_digits_net.needs_batches = ("features",)
build_digits_net.meta_buildable = True
