"""Built-in models: ``model=<name>`` -> its builder (Hydra's ``_target_``). The builder's
options (its signature, or a ``Config`` attribute) are the group's keys; packages add
models through the ``thinwire.models`` entry-point group.

Names are imported on first use, so that a torch-free module of this package (a model's
options: ``gpt_options``) imports without the models (``thinwire.config.fast``)."""
from __future__ import annotations

import functools
import importlib

_BUILDERS = {"build_gpt": ".gpt", "build_hf_classifier": ".hf", "build_digits_net": ".mlp"}
__all__ = ["MODELS", *_BUILDERS]


@functools.cache
def _models():
    from ..registry import Registry

    models = Registry("model", "thinwire.models")
    models.register("gpt_char")(__getattr__("build_gpt"))
    models.register("hf_classifier")(__getattr__("build_hf_classifier"))
    models.register("mlp_digits")(__getattr__("build_digits_net"))
    return models


def __getattr__(name: str):
    if name == "MODELS":
        return _models()
    if name in _BUILDERS:
        return getattr(importlib.import_module(_BUILDERS[name], __name__), name)
    raise AttributeError(f"module 'thinwire.models' has no attribute {name!r}")
