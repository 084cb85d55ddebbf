"""Assemble the run config: compose (Hydra + the key rules), register the schemas that the
parts declare next to their classes, validate (each part's checks + cross-group rules) and
expand sweeps. Nothing here defines an option: see ``thinwire.options``."""
from ..errors import ConfigError, one_line
from .compose import compose, from_yaml, to_yaml
from .rules import validate
from .schema import config_dir, register_schemas
from .sweep import expand_sweep

__all__ = ["ConfigError", "compose", "config_dir", "expand_sweep", "from_yaml", "one_line",
           "register_schemas", "to_yaml", "validate"]
