"""``thinwire-train --multirun``: Hydra's sweep syntax (``comm=topk,int8 optim.lr=1e-3,3e-3``)
expanded into one job per combination, like Hydra's basic sweeper, each with its own run
directory ``<hydra.sweep.dir>/<n>`` (default ``multirun/<timestamp>/<n>``) and, unless set,
one wandb group per sweep and a wandb run name from the job's number and its combination
(``3_comm=int8_optim.lr=3e-3``).
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
    # ++: set where the logger has the key (logger=none has none: nothing to name)
    group = [] if any(a.lstrip("+").startswith("logger.group=") for a in fixed) else \
        [f"++logger.group={sweep_dir.replace('/', '_')}"]
    named = any(a.lstrip("+").startswith("logger.name=") for a in fixed)
    jobs = []
    for n, combo in enumerate(itertools.product(*axes) if axes else [()]):
        name = [] if named else ["++logger.name='" + "_".join([str(n), *combo]).replace("'", "") + "'"]
        jobs.append([*fixed, *combo, *group, *name, f"hydra.run.dir={sweep_dir}/{n}"])
    return jobs


ADDED = ("hydra.run.dir=", "++logger.group=", "++logger.name=")  # what expand_sweep adds to a job


def user_overrides(job: list[str]) -> list[str]:
    """A job's overrides as the user gave them (``.hydra/overrides.yaml``), without the run
    dir, wandb group and run name that :func:`expand_sweep` adds."""
    return [a for a in job if not a.startswith(ADDED)]
