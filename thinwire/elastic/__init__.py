"""Elastic replicas for the local-update modes (``sync=local`` / ``sync=diloco``): a replica
that dies, hangs or is late leaves the round, the live replicas finish it among themselves
(mean over the live set), a restarted replica heals from the lowest live slot and joins at the
next round; every round's live set and heals are written to a membership tape that a
single-process reference replays bitwise (docs/elastic.md).

Layers:
- :mod:`.state`: consensus state as JSON metadata + raw tensors (no pickle), digests;
- :mod:`.replica`: one slot's model, inner optimizer, anchor and outer optimizer (thinwire's
  ``ModuleParams`` and ``OuterOptimizer``); local steps keyed by (slot, nominal N, step);
- :mod:`.protocol`: the round's sync over a :class:`~.membership.Membership` (header, live
  mean, commit vote, heal, retry with the survivors);
- :mod:`.membership`: the interface, torchft's Manager + lighthouse behind it
  (:class:`~.membership.TorchftMembership`), and an in-process hub for the simulator;
- :mod:`.tape`: the membership tape and its single-process replay (the reference);
- :mod:`.simulator`: R replicas as threads of one process over the hub, with a schedule of
  kills, restarts and late replicas;
- :mod:`.config`: ``elastic=torchft`` options and their one-line errors.
"""
from .config import ElasticConfig, check_elastic  # light: the config schema imports only this

__all__ = ["ElasticConfig", "check_elastic"]
