"""Your own models: builders that ``model._target_=my_project.models.<builder>`` names.

The contract (docs/your_model.md): a builder's positional-or-keyword parameters are its
options (``model.<name>=...`` on the command line, typed by their annotations, defaults
written once here); ``info`` (``thinwire.data.base.DataInfo``: the data set's
``vocab_size``, ``num_classes``, ``n_features``) is passed by the trainer as a keyword-only
argument. The module it returns is called as ``model(**batch)`` on the data set's batches
and returns the scalar loss; a classifier that also has ``logits(x)`` gets ``val_accuracy``
logged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalLM(nn.Module):
    """A Hugging Face causal LM on thinwire's character windows: ``x`` (B, T) token ids,
    ``y`` (B, T) the next ids; the loss is the mean next-token cross-entropy."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def build_hf_causal_lm(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 64, *,
                       info) -> CausalLM:
    """GPT-2's architecture from ``transformers.GPT2Config`` (randomly initialised: nothing is
    downloaded), sized by the options; the vocabulary comes from the data set. ``block_size``
    is an option because ``data=shakespeare`` takes its window length from
    ``model.block_size``. Dropout is off, as in thinwire's own char-GPT preset for short runs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=info.vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return CausalLM(GPT2LMHeadModel(config))


class SmallCNN(nn.Module):
    """A torchvision-style CNN (conv-BN-ReLU stages, global average pooling, a linear head;
    the shape of torchvision's ResNet stem without the residuals) for square one-channel
    images given as flat features, e.g. ``data=digits``: ``x`` (B, 64), ``y`` (B,)."""

    def __init__(self, n_features: int, num_classes: int, channels: int):
        super().__init__()
        side = int(round(n_features ** 0.5))
        if side * side != n_features:
            raise ValueError(f"SmallCNN needs square images, got {n_features} features")

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(nn.Unflatten(1, (1, side, side)), stage(1, channels),
                                      stage(channels, 2 * channels), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * channels, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y)


def build_cnn(channels: int = 16, *, info) -> SmallCNN:
    """``model._target_=my_project.models.build_cnn model.channels=32``."""
    return SmallCNN(info.n_features, info.num_classes, channels)
