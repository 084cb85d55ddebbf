"""``thinwire-train --multirun``: Hydra's sweep syntax (``comm=topk,int8 optim.lr=1e-3,3e-3``)
expanded into one job per combination, like Hydra's basic sweeper, each with its own run
directory ``<hydra.sweep.dir>/<n>`` (default ``multirun/<timestamp>/<n>``) and, unless set,
one wandb group per sweep.
"""
from __future__ import annotations

import itertools
import time

from ..errors import ConfigError, one_line


def expand_sweep(argv: list[str]) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(argv)
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    fixed, axes = [], []
    sweep_dir = "multirun/" + time.strftime("%Y-%m-%d_%H-%M-%S")
    for o in overrides:
        if o.key_or_group == "hydra.sweep.dir":
            sweep_dir = o.get_value_element_as_str()
        elif o.is_sweep_override():
            key = o.input_line.split("=", 1)[0]
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    if any(a.startswith("hydra.run.dir=") for a in fixed):
        raise ConfigError("hydra.run.dir: with --multirun set hydra.sweep.dir (each job gets <sweep dir>/<n>)")
    group = [] if any(a.startswith("logger.group=") for a in fixed) else \
        [f"logger.group={sweep_dir.replace('/', '_')}"]
    jobs = []
    for n, combo in enumerate(itertools.product(*axes) if axes else [()]):
        jobs.append([*fixed, *combo, *group, f"hydra.run.dir={sweep_dir}/{n}"])
    return jobs
