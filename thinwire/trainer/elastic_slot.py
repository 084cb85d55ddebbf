"""``thinwire-train ... elastic=torchft``: one slot of an elastic run, as a process of its own.

The launcher (``thinwire.elastic.launch.launch_trainer``) starts the lighthouse and one process
per slot (``thinwire-train --slot s --lighthouse host:port <overrides>``: ``thinwire.train.slot_main``,
or one ``torchrun --max-restarts`` per slot). Each is a world of size 1: slots meet only through
torchft's quorum and process groups. The slot runs the trainer's own loop
(``thinwire.trainer.loop.Trainer``) with three changes, all here:

- **place**: it trains slot s's batches of the nominal N slots (``dist.nproc``), keyed exactly as
  the ordinary trainer keys rank s of world size N; faults take ``trainer.faults.rank`` as the
  slot; it evaluates the whole validation set (the consensus after each round: every live slot's
  parameters are the anchor);
- **sync**: :class:`ElasticSync`, the round's sync of ``thinwire.elastic.protocol.ElasticRunner``
  (live mean, commit vote, retry with the survivors, heal by broadcast; under ``comm=chunk_topk``
  the compressed exchange with error feedback of ``thinwire.elastic.exchange``) on a
  ``thinwire.elastic.replica.Replica`` built from the trainer's model, its inner optimizer (the
  joiner rule clears its state) and the outer optimizer ``sync.*`` configures (with the nominal
  N for ``sync=diloco``'s tuned outer lr, as the ordinary trainer resolves it);
- **metrics**: the slot's own ``<run>/slot<s>/metrics.jsonl`` (and its checkpoints in
  ``<run>/slot<s>/checkpoints``), the run's ``<run>/metrics.jsonl`` written by the lowest live slot
  of the latest round it committed, and the membership tape ``<run>/elastic/slot<s>.jsonl``
  (``thinwire.elastic.tape``).

A restarted slot (attempt > 0) is a joiner: it takes no part in a round until it has healed from
the lowest live slot, then continues at the consensus round's first step. A slot that sat a round
out (late, stale) heals and jumps the same way (``next_step``).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..comm.outer_optimizer import OuterOptimizer, outer_spec
from ..comm.sync import SyncStrategy
from ..elastic.absence import round_metrics
from ..elastic.exchange import RowCodec
from ..elastic.launch import start_barrier
from ..elastic.protocol import ElasticRunner, NoFaults
from ..elastic.replica import Replica, ReplicaSpec
from ..elastic.worker import attempt
from .loop import Trainer


class CollectiveFault(NoFaults):
    """``trainer.faults.kill_in_collective_at=ROUND``: SIGKILL slot ``trainer.faults.rank`` after
    that round's header, inside its outer collective (first attempt only)."""

    def __init__(self, faults, slot: int):
        at = faults.get("kill_in_collective_at")
        self.at = at if faults.rank == slot and attempt() == 0 else None

    def before_data(self, slot: int, rnd: int) -> None:
        if self.at == rnd:
            os.kill(os.getpid(), signal.SIGKILL)


class ElasticSync(SyncStrategy):
    """The elastic round as the trainer's sync strategy (module docstring)."""
    needs_grad_allreduce = False
    ranks_diverge = True

    def __init__(self, trainer: "SlotTrainer", tape_path: str):
        cfg = trainer.cfg
        super().__init__(cfg.sync, trainer.world, trainer.meter, trainer.model, cfg.comm)
        self.H, self.N, self.slot = cfg.sync.local_steps, trainer.slots, trainer.slot
        spec, _ = outer_spec(cfg.sync.outer_optim, self.H, self.N)
        optimizer = trainer.plugin.optimizer

        def fresh_inner(params):  # the joiner rule: the trainer's own inner optimizer, its state cleared
            optimizer.state.clear()
            return optimizer

        self.replica = Replica(ReplicaSpec(local_steps=self.H, nominal=self.N, seed=cfg.trainer.seed), self.slot,
                               model=trainer.model, inner=fresh_inner,
                               outer=lambda anchor, norm: OuterOptimizer(anchor, cfg.sync, norm=norm, spec=spec))
        if cfg.comm.name != "none":  # compressed pseudo-gradients with error feedback (thinwire.elastic.exchange)
            self.replica.exchange = RowCodec(OmegaConf.to_container(cfg.comm, resolve=True),
                                             self.replica.space.names, self.replica.space.sizes)
        self.tape_path, self.trainer_cfg = tape_path, cfg
        self.runner = None  # connect(): once the slot is ready to ask for a quorum
        self.writer = self.slot == 0  # writes the run's metrics.jsonl: the lowest live slot

    def connect(self, membership) -> None:
        cfg = self.trainer_cfg
        self.runner = ElasticRunner(self.replica, membership, cfg.trainer.max_steps // self.H,
                                    min_replicas=cfg.elastic.min_replicas,
                                    faults=CollectiveFault(cfg.trainer.faults, self.slot), log=self.tape)

    def tape(self, record: dict) -> None:
        with open(self.tape_path, "a") as fh:
            fh.write(json.dumps(dict(record, slot_writer=self.slot, attempt=attempt(), t=time.time())) + "\n")

    def join(self) -> int:
        """A joiner: sit out rounds until healed from the lowest live slot; the step to start at."""
        self.replica.round = -1
        self.writer = False
        self.runner.sync(None)
        return self.replica.round * self.H

    def after_step(self, step: int) -> dict:
        if (step + 1) % self.H:
            return {}
        rep, seen = self.replica, len(self.runner.records)
        rnd = rep.round
        assert rnd == step // self.H, f"slot {self.slot}: round {rnd} at step {step + 1}"
        self.runner.sync((rnd, rep.pseudo_gradient()))
        done = [r for r in self.runner.records[seen:] if r["kind"] == "round"]
        if not done:  # stale: its round entered no mean (logged lost); healed to the consensus round
            return {"outer_round": rep.round, "elastic_stale_round": rnd}
        r = done[-1]
        self.writer = r["live_slots"][0] == self.slot
        ex = {} if rep.exchange is None else {"elastic_row_bytes": rep.exchange.row_bytes,
                                              "residual_norm": rep.exchange.residual_norm()}
        return {**round_metrics(r["round"], r["live_slots"], self.N, self.H), "outer_round": rep.round,
                "elastic_retries": r["retries"], "elastic_stall_s": r["stall_s"], **skipped_round(r, self.N, self.H),
                **ex}

    def next_step(self, done: int) -> int:
        return max(done, self.replica.round * self.H) if done % self.H == 0 else done

    @property
    def round_steps(self) -> int:
        return self.H

    def consensus_state(self) -> dict:
        rep = self.replica
        return {f"anchor.{n}": a for n, a in zip(rep.space.names, rep.anchor)}

    @contextlib.contextmanager
    def eval_model(self):
        yield self.model  # at a round's end the slot's parameters are the consensus anchor

    def state_dict(self) -> dict:
        rep = self.replica
        return {**rep.consensus_state(), **({} if rep.exchange is None else {"residual": rep.exchange.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        rep = self.replica
        rep.round = int(state["round"])
        with torch.no_grad():
            for a, s in zip(rep.anchor, state["anchor"]):
                a.copy_(s)
        rep.outer.load_state_dict(state["outer"])
        if rep.exchange is not None:
            rep.exchange.load_state_dict(state.get("residual", {}))

    def close(self) -> None:
        pass


def skipped_round(r: dict, slots: int, steps: int) -> dict:
    """A round the finiteness vote skipped (``r["nonfinite"]``): ``outer_skipped`` (as the
    non-elastic sync=local) and every slot's steps of the round in ``lost_steps``."""
    if not r.get("nonfinite"):
        return {}
    return {"outer_skipped": 1, "outer_skipped_slots": r["nonfinite"],
            "lost_steps": round_metrics(r["round"], [], slots, steps)["lost_steps"]}


class RejoinWait:
    """``trainer.faults.rejoin_wait_at=ROUND`` (drill pacing): in their first attempt, the slots
    other than ``trainer.faults.rank`` wait before round ROUND's first step until that slot's
    restarted process is up (``<run>/elastic/up.<slot>``, written once its Manager is up), at most
    ``elastic.quorum_timeout_s``. A drill's kill and restart then end in a rejoin however long the
    machine takes to start a process, without pacing every step."""

    def __init__(self, cfg, out: str, slot: int):
        f = cfg.trainer.faults
        at = f.get("rejoin_wait_at")
        self.path = os.path.join(out, f"up.{f.rank}")
        self.step = at * cfg.sync.local_steps if at is not None and slot != f.rank and attempt() == 0 else None
        self.mine = os.path.join(out, f"up.{slot}")
        self.timeout_s = cfg.elastic.quorum_timeout_s

    def up(self) -> None:
        open(self.mine, "w").close()

    def before(self, done: int) -> None:
        if done != self.step:
            return
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)


class RunMetrics:
    """The slot's own metrics file, and the run's ``metrics.jsonl``, appended to (one line per
    write) while this slot is the lowest live slot."""

    def __init__(self, own, run_dir: str, sync: ElasticSync):
        self.own, self.sync = own, sync
        self.path = os.path.join(run_dir, "metrics.jsonl")

    @property
    def resume_step(self) -> int:
        return self.own.resume_step

    @resume_step.setter
    def resume_step(self, step: int) -> None:
        self.own.resume_step = step

    def log(self, record: dict) -> None:
        self.own.log(record)
        if self.sync.writer:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.own.close()


class SlotTrainer(Trainer):
    """The trainer of slot ``slot`` (module docstring); ``cfg.run_dir`` is the slot's own
    directory, ``run_dir`` the run's."""

    def __init__(self, cfg, world, *, slot: int, run_dir: str, membership):
        self._slot, self.run_dir = slot, run_dir
        super().__init__(cfg, world)
        self.eval_data = instantiate(cfg.data, seed=cfg.trainer.seed, rank=0, world_size=1)  # the whole set
        if self.metrics is not None:
            self.metrics = RunMetrics(self.metrics, run_dir, self.sync)
        out = os.path.join(run_dir, "elastic")
        # the Manager last: its heartbeats say "alive", and a quorum waits elastic.grace_s for a
        # live slot that has not asked yet (a slot still building its trainer would stall the others)
        self.membership = membership()
        self.sync.connect(self.membership)
        self.sync.tape({"kind": "start", "joiner": attempt() > 0})  # setup done (G4: a joiner's first round after it)
        self.rejoin = RejoinWait(cfg, out, slot)
        if attempt() > 0:  # a restarted slot heals (its own checkpoint, if loaded, is replaced)
            self.rejoin.up()
            self.start_step = self.sync.join()
            if self.metrics is not None:
                self.metrics.resume_step = self.start_step
        else:
            start_barrier(out, slot, self.slots, cfg.elastic.quorum_timeout_s)

    def place(self) -> tuple[int, int]:
        return self._slot, self.cfg.dist.nproc

    def make_sync(self):
        return ElasticSync(self, os.path.join(self.run_dir, "elastic", f"slot{self._slot}.jsonl"))

    def next_step(self, done: int) -> int:
        # trainer.faults.drift_at: one ulp on this slot's anchor; the next round's header (the
        # drift guard over the live set, thinwire.elastic.protocol) stops the run
        self.faults.corrupt(self.sync.consensus_state(), done)
        self.rejoin.before(done)
        return self.sync.next_step(done)

    def close(self) -> None:
        super().close()
        if getattr(self, "membership", None) is not None:
            self.membership.shutdown()


def slot_dir(run_dir: str, slot: int) -> str:
    return os.path.join(run_dir, f"slot{slot}")
