"""Deprecated: moved to :mod:`thinwire.config` (``compose``, ``validate``, ``to_yaml``, ...).

An earlier README documented ``from thinwire.trainer.config import compose``; this shim keeps
that import working for one more release and warns once, at import. Import from
``thinwire.config`` instead. (It sits on the top layer of tools/import_graph.py whatever its
path: it imports ``thinwire.config``, which nothing else under ``thinwire.trainer`` may.)
"""
import warnings

warnings.warn("thinwire.trainer.config is deprecated and will be removed in the next release: "
              "import from thinwire.config instead (e.g. from thinwire.config import compose)",
              DeprecationWarning, stacklevel=2)

from ..config import *  # noqa: E402,F401,F403
from ..config import __all__  # noqa: E402,F401
