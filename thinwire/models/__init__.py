"""Built-in models: ``model=<name>`` -> its builder (Hydra's ``_target_``). The builder's
options (its signature, or a ``Config`` attribute) are the group's keys; packages add
models through the ``thinwire.models`` entry-point group."""
from ..registry import Registry
from .gpt import build_gpt
from .hf import build_hf_classifier
from .mlp import build_digits_net

MODELS = Registry("model", "thinwire.models")
MODELS.register("gpt_char")(build_gpt)
MODELS.register("hf_classifier")(build_hf_classifier)
MODELS.register("mlp_digits")(build_digits_net)
