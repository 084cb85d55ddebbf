"""The outer loop: rounds of H local steps, then an outer step on the anchor with the
averaged pseudo-gradient (``sync=local``, DiLoCo's recipe ``sync=diloco``, ``sync=co2``,
eager updates, Streaming DiLoCo, SparseLoCo: configurations of one strategy).

This module is the outer loop's public import path; each part lives in a module of its own:

- ``param_space``: :class:`ParamSpace`, the parameters the loop reads, writes and averages
  (:class:`ModuleParams`), and :class:`Replicas`, the groups it talks over
  (:class:`DataParallel`; ZeRO replica groups in ``thinwire.trainer.zero_replicas``);
- ``rounds``: a round as plain data (:class:`Round`: fragments, offsets, delay, merge rule),
  built from ``sync.*`` (:class:`LocalConfig`, :class:`CO2Config`);
- ``local``: :class:`OuterStrategy`, which runs a round (``sync=local``; :class:`CO2` is
  ``sync=co2``: the same strategy with the overlap's options);
- ``outer_optimizer``: :class:`OuterOptimizer`, any torch optimizer on the anchor, after clipping;
- ``moments``: averaging the inner optimizer's moments (``sync.moment1_every``/``moment2_every``).

Importing it registers ``local`` and ``co2`` in ``thinwire.comm.sync.SYNC_STRATEGIES``.
"""
from __future__ import annotations

from .local import CO2, OuterStrategy, staleness_penalty
from .outer_optimizer import OuterOptimizer, build_outer_optimizer, default_outer_optim
from .param_space import DataParallel, ModuleParams, ParamSpace, Replicas, global_norm
from .rounds import CO2_RECIPE, OVERLAP_DEFAULTS, CO2Config, LocalConfig, Round, co2_options, round_of

LocalUpdates = OuterStrategy  # the name of earlier versions

__all__ = ["CO2", "CO2Config", "CO2_RECIPE", "DataParallel", "LocalConfig", "LocalUpdates", "ModuleParams",
           "OVERLAP_DEFAULTS", "OuterOptimizer", "OuterStrategy", "ParamSpace", "Replicas", "Round",
           "build_outer_optimizer", "co2_options", "default_outer_optim", "global_norm", "round_of",
           "staleness_penalty"]
