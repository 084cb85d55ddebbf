"""``trainer.faults.absent_at`` in thinwire-train (issue 33's planned absence) against the
elastic package's single-process tape replay (``thinwire.elastic.tape.replay`` over
``tape.planned``): the same live sets, the mean over the live slots summed in slot order, the
joiner's state rules (parameters = anchor, inner optimizer fresh). The replay's slots are given
the trainer's model, data, AdamW and LR schedule, written here with plain torch."""
import json

import pytest
import torch

from thinwire.config import compose
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.tape import planned, replay
from thinwire.optim.schedule import lr_at

from conftest import cli_error

H, STEPS = 4, 20
TINY = ["experiment=tiny", "model.dropout=0.0", f"trainer.max_steps={STEPS}", f"sync.local_steps={H}",
        f"trainer.eval_every={STEPS}", f"trainer.checkpoint_every={STEPS}", "trainer.log_every=1", "dist.nproc=2"]


class Forward(torch.nn.Module):
    """The trainer's model (``model(**batch)`` -> loss) as a Replica's ``model(x)``."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, batch):
        return self.m(**batch)


class TrainerSlot(Replica):
    """One slot as the trainer steps it: the LR of the global step, AdamW on nanoGPT's decay
    groups (weight decay on matrices only), the optional gradient clip."""

    def __init__(self, cfg, data, slot, joiner):
        from hydra.utils import instantiate

        torch.manual_seed(cfg.trainer.seed)  # the trainer's initial parameters
        model = Forward(instantiate(cfg.model, info=data[0].info))
        o = cfg.optim
        self.o, self.steps_total = o, cfg.trainer.max_steps

        def inner(params):
            ps = list(params)
            groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": o.weight_decay},
                      {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)

        spec = ReplicaSpec(sync="diloco" if cfg.sync.outer_optim.get("momentum") else "local", local_steps=H,
                           nominal=len(data), seed=cfg.trainer.seed, clip=cfg.sync.clip)
        super().__init__(spec, slot, joiner, model=model, inner=inner,
                         batch=lambda s, t: data[s].train_batch(t), loss=lambda out, y: out)

    def train_step(self, step: int) -> float:
        o = self.o
        lr = lr_at(step, lr=o.lr, max_steps=self.steps_total, schedule=o.schedule, warmup_steps=o.warmup_steps,
                   min_lr_ratio=o.min_lr_ratio, decay_start=o.decay_start)
        for g in self.inner.param_groups:
            g["lr"] = lr
        self.inner.zero_grad(set_to_none=False)
        loss = self.model(self._batch(self.slot, step))
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), o.grad_clip)
        self.inner.step()
        self.losses[step] = float(loss.detach())
        return self.losses[step]


def reference(overrides, absent):
    from hydra.utils import instantiate

    torch.set_num_threads(1)  # the pooled ranks run one thread each: same kernels, same floats
    cfg = compose(list(overrides))
    n = cfg.dist.nproc
    data = [instantiate(cfg.data, seed=cfg.trainer.seed, rank=r, world_size=n) for r in range(n)]
    tape = planned(n, STEPS // H, absent)
    reps = replay(None, tape, check_digests=False, make_replica=lambda s, j: TrainerSlot(cfg, data, s, j))
    return tape, reps


def rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("sync", ["local", "diloco"])
def test_planned_absence_equals_the_tape_replay_bitwise(pools, tmp_path, sync):
    """2 slots, 5 rounds of H=4: slot 1 sits out rounds 1-2 and rejoins in round 3."""
    args = [*TINY, f"sync={sync}", 'trainer.faults.absent_at="1:1..2"']
    pools.train(*args, f"hydra.run.dir={tmp_path}")
    tape, reps = reference(args, {1: (1, 2)})
    got = rows(tmp_path)
    losses = {r["step"] - 1: r["loss"] for r in got}
    assert losses == {t: reps[0].losses[t] for t in range(STEPS)}  # slot 0's own losses, every step
    ckpt = tmp_path / "checkpoints" / f"step_{STEPS:08d}"
    for slot in (0, 1):
        state = torch.load(ckpt / f"rank{slot:05d}.pt", weights_only=False)
        want = {k[2:]: v for k, v in reps[slot].model.state_dict().items()}
        assert state["model"].keys() == want.keys()
        assert all(torch.equal(state["model"][k], want[k]) for k in want), (sync, slot)
    rounds = [r for r in got if "live_slots" in r]
    assert [r["step"] for r in rounds] == [H * (k + 1) for k in range(STEPS // H)]
    assert [r["live_slots"] for r in rounds] == tape.live_sets() == [[0, 1], [0], [0], [0, 1], [0, 1]]
    assert [r["live_replicas"] for r in rounds] == [2, 1, 1, 2, 2]
    assert [r["lost_steps"] for r in rounds] == [[], [[1, 5, 8]], [[1, 9, 12]], [], []]
    assert [tuple(x) for r in rounds for x in r["lost_steps"]] == \
        [(s, a + 1, b + 1) for s, a, b in [(1, 4, 7), (1, 8, 11)]]  # = tape.untrained, split per round
    assert tape.untrained(2, H) == [(1, 4, 11)]
    assert not [k for r in got for k in r if "live" in k and k not in ("live_replicas", "live_slots")]


@pytest.mark.parametrize("overrides, line", [
    (['trainer.faults.absent_at="1-2..3"'], 'trainer.faults.absent_at=1-2..3: expected "SLOT:FIRST..LAST"'),
    (['trainer.faults.absent_at="1:3..2"'], "trainer.faults.absent_at=1:3..2: the first round 3 is after the last 2"),
    (['trainer.faults.absent_at="2:1..2"'], "trainer.faults.absent_at=2:1..2: slot 2 is not a slot of this run"),
    (['trainer.faults.absent_at="0:1..2"'], "slot 0 writes the metrics line"),
    (['trainer.faults.absent_at="1:1..5"'], "round 5 is past the run's last outer round 4"),
    (["sync=ddp", 'trainer.faults.absent_at="1:1..2"'], "sync=ddp: a planned absence needs sync=local or "
                                                        "sync=diloco (sync=ddp is fail-stop"),
    (["sync=co2", 'trainer.faults.absent_at="1:1..2"'], "sync=co2: a planned absence needs"),
    (["comm=int8", 'trainer.faults.absent_at="1:1..2"'], "comm=int8: a compressed mean"),
    (["sync.fragments=2", 'trainer.faults.absent_at="1:1..2"'], "sync.fragments=2: a planned absence runs one"),
])
def test_bad_absent_at_is_one_line_exit_2(capsys, overrides, line):
    base = [o for o in TINY if not o.startswith("hydra")] + ["sync=local"]
    if "sync=ddp" in overrides or "sync=co2" in overrides:
        base.remove("sync=local")
        base.remove(f"sync.local_steps={H}") if "sync=ddp" in overrides else None
    code, err = cli_error(capsys, *base, *overrides)
    assert code == 2 and line in err, err


@pytest.mark.extended  # three runs (158 s on the pooled ranks at load average ~125, pool start included)
def test_stopped_during_the_absence_resumes_bitwise(pools, tmp_path):
    """A checkpoint inside the absence (step 10: slot 1 absent in rounds 1-2 = steps 5-12) and
    ``trainer.resume=auto`` continue the same run: the live mask comes from the config."""
    args = [*TINY, "sync=diloco", 'trainer.faults.absent_at="1:1..2"']
    full, split = tmp_path / "full", tmp_path / "split"
    pools.train(*args, f"hydra.run.dir={full}")
    pools.train(*args, "trainer.stop_after=10", f"hydra.run.dir={split}")
    pools.train(*args, "trainer.resume=auto", f"hydra.run.dir={split}")
    key = ("step", "loss", "live_slots", "lost_steps", "val_loss")
    assert [[r.get(k) for k in key] for r in rows(full)] == [[r.get(k) for k in key] for r in rows(split)]
    for slot in (0, 1):
        a, b = (torch.load(d / "checkpoints" / f"step_{STEPS:08d}" / f"rank{slot:05d}.pt", weights_only=False)["model"]
                for d in (full, split))
        assert all(torch.equal(a[k], b[k]) for k in a), slot
