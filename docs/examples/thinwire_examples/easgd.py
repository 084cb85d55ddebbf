# thinwire_examples/easgd.py
"""Elastic averaging SGD (Zhang, Choromanska & LeCun 2015, "Deep learning with Elastic
Averaging SGD", Sec. 3: the synchronous update, every tau = ``period`` steps)::

    every `period` steps, on every rank i, after its own optimizer step:
        d_i = x_i - c                   distance of the worker from the centre
        m = mean_i d_i                  one average through the comm layer (any comm=)
        x_i <- x_i - alpha d_i          elastic pull, alpha = beta / p
        c <- c + beta m                 the centre moves toward the workers

Workers never become equal (``ranks_diverge``); the centre c is identical on every rank
(it starts at the common initial parameters and moves by the common mean), and it is the
model that is evaluated, at no communication cost. The centre and the round counter are the
consensus state: the drift guard hashes them on every rank once per period.
"""
import contextlib
import time
from dataclasses import dataclass

import torch

from thinwire.comm.averager import CompressedAverager
from thinwire.comm.outer import ModuleParams
from thinwire.comm.sync import SyncStrategy
from thinwire.errors import need


@dataclass
class EASGDConfig:
    period: int = 4  # tau: local steps between elastic updates
    beta: float = 0.9  # the centre's moving rate (beta = p * alpha, as in the paper)

    def check(self):
        need(self.period >= 1, "period", self.period, "must be >= 1")
        need(0 < self.beta <= 1, "beta", self.beta, "must be in (0, 1]")


class ElasticAveraging(SyncStrategy):
    Config = EASGDConfig
    needs_grad_allreduce = False  # no DDP, no per-step gradient all-reduce
    ranks_diverge = True  # checkpoints keep every rank's own parameters and optimizer

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas=None):
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        self.space = ModuleParams(model)  # the trainable parameters as one flat fp32 vector
        self.centre = self.space.read_flat()  # c = x_0, the same on every rank
        self.averager = CompressedAverager(comm_cfg if comm_cfg is not None else {"name": "none"}, meter,
                                           group=world.async_group if world.world_size > 1 else None)
        self.alpha = cfg.beta / world.world_size
        self.round = 0

    def after_step(self, step):
        if (step + 1) % self.cfg.period:
            return {}
        t0 = time.perf_counter()
        x = self.space.read_flat()
        d = x - self.centre
        m = self.averager.average(self.space.names, self.space.sizes, d, self.round)
        self.averager.commit()  # error-feedback state of this average (if comm.feedback is set)
        wait = time.perf_counter() - t0
        self.space.write_flat(x.sub_(d, alpha=self.alpha))
        self.centre.add_(m, alpha=self.cfg.beta)
        self.round += 1
        return {"comm_wait_s": wait, "elastic_distance": float(d.norm()), **self.averager.take_stats()}

    @property
    def round_steps(self):
        return self.cfg.period  # the drift guard checks at the end of an elastic round

    def consensus_state(self):
        """Bitwise equal on every rank at a round's end (the workers legitimately differ)."""
        return {"centre": self.centre, "round": torch.tensor(self.round)}

    @contextlib.contextmanager
    def eval_model(self):
        live = self.space.read_flat()
        self.space.write_flat(self.centre)
        try:
            yield self.model
        finally:
            self.space.write_flat(live)

    def state_dict(self):
        return {"centre": self.centre.clone(), "round": self.round, "averager": self.averager.state_dict()}

    def load_state_dict(self, state):
        self.centre.copy_(state["centre"])
        self.round = state["round"]
        self.averager.load_state_dict(state["averager"])
