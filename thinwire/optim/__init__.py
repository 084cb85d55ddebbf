"""Optimizers: the trainer's plugins (``optim=``) and, for a loop of your own, the
zeroth-order optimizers as ``torch.optim.Optimizer`` and LoRA-GA's initialisation
(docs/library.md)::

    from thinwire.optim import MeZO, ZODist, lora_ga_init
"""
# The built-in parts register themselves in their registries (``plugins.OPTIMIZERS``,
# ``peft.PEFT_METHODS``) on import; importing any module of this package runs this first,
# so the registries are whole whichever module a caller imports. A new built-in plugin is
# its module plus one line here.
from . import adam1bit, demo, mezo, mtdao, zo_dist  # noqa: F401 - optim=adam1bit|demo|mezo|mtdao|zo_dist
from . import lora  # noqa: F401 - peft=lora|lora_ga (PEFT itself is imported on use)
from .lora import lora_ga_init
from .mezo import MeZO
from .zo_dist import ZODist

__all__ = ["MeZO", "ZODist", "lora_ga_init"]
