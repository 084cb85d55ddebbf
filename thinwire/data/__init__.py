"""Built-in data sets: ``data=<name>`` -> its class (Hydra's ``_target_``). A data set's
options are its ``__init__``'s positional-or-keyword parameters (``batch_size`` first);
``seed``, ``rank`` and ``world_size`` are keyword-only and come from the trainer. Packages
add data sets through the ``thinwire.data`` entry-point group."""
from ..registry import Registry
from .digits import Digits
from .shakespeare import ShakespeareChars, ShakespeareLines

DATASETS = Registry("data", "thinwire.data")
DATASETS.register("shakespeare")(ShakespeareChars)
DATASETS.register("shakespeare_lines")(ShakespeareLines)
DATASETS.register("digits")(Digits)
