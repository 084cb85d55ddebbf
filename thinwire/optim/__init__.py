"""Optimizers: the trainer's plugins (``optim=``) and, for a loop of your own, the
zeroth-order optimizers as ``torch.optim.Optimizer`` and LoRA-GA's initialisation
(docs/library.md)::

    from thinwire.optim import MeZO, ZODist, lora_ga_init
"""
from .lora import lora_ga_init
from .mezo import MeZO
from .zo_dist import ZODist

__all__ = ["MeZO", "ZODist", "lora_ga_init"]
