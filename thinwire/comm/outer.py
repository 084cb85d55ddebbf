"""The outer loop: rounds of H local steps, then an outer step on the anchor with the
averaged pseudo-gradient (``sync=local``, DiLoCo's recipe ``sync=diloco``, ``sync=co2``).

This module is the outer loop's public import path; each part lives in a module of its own:

- ``param_space``: :class:`ParamSpace`, the parameters the loop reads, writes and averages
  (:class:`ModuleParams`; ZeRO replica groups: :class:`Replicas`);
- ``outer_optimizer``: :class:`OuterOptimizer`, any torch optimizer on the anchor, after clipping;
- ``local``: ``sync=local`` (:class:`LocalUpdates`, :class:`LocalConfig`): the synchronous
  round and what CO2 shares with it (pseudo-gradient, non-finite agreement, evaluation, checkpoint);
- ``co2``: ``sync=co2`` (:class:`CO2`, :class:`CO2Config`): the average overlaps the next
  round, stale by one round, with the staleness-gap penalty;
- ``eager``: ``sync.overlap=eager``, Kale et al.'s eager updates (:class:`EagerUpdates`);
- ``streaming``: Streaming DiLoCo's fragments (``sync.fragments``, :class:`FragmentStreaming`);
- ``moments``: averaging the inner optimizer's moments (``sync.moment1_every``/``moment2_every``).

Importing it registers ``local`` and ``co2`` in ``thinwire.comm.sync.SYNC_STRATEGIES``.
"""
from __future__ import annotations

from .co2 import CO2, CO2_RECIPE, OVERLAP_DEFAULTS, CO2Config, co2_options, staleness_penalty
from .eager import EagerUpdates
from .local import LocalConfig, LocalUpdates
from .outer_optimizer import OuterOptimizer, build_outer_optimizer, default_outer_optim
from .param_space import ModuleParams, ParamSpace, Replicas, global_norm
from .streaming import FragmentStreaming

__all__ = ["CO2", "CO2Config", "CO2_RECIPE", "EagerUpdates", "FragmentStreaming", "LocalConfig", "LocalUpdates",
           "ModuleParams", "OVERLAP_DEFAULTS", "OuterOptimizer", "ParamSpace", "Replicas", "build_outer_optimizer",
           "co2_options", "default_outer_optim", "global_norm", "staleness_penalty"]
