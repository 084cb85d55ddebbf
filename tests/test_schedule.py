"""The warm-up-stable-decay schedule (``optim.schedule=wsd``) and decay branches: its values
against a piecewise-linear reference (``numpy.interp`` through the schedule's corners), the
resume check that lets ``optim.decay_start`` change only at or before the decay, and a branch
resumed from a constant-LR run's checkpoint equal bitwise to the run configured with that
decay from the start (same seed and data order)."""
import json

import numpy as np
import pytest
import torch

from thinwire.config.resume import ResumeConfigError, check_resume_config
from thinwire.optim.schedule import lr_at


def reference(t: int, lr: float, T: int, W: int, start: int, m: float) -> float:
    """Warm-up (t + 1) / W, then the polyline (W, lr) -> (start, lr) -> (T, m lr)."""
    if t < W:
        return lr * (t + 1) / W
    return float(np.interp(t, [W, start, T], [lr, lr, m * lr]))


@pytest.mark.parametrize("T,W,start,m", [(100, 10, None, 0.1), (100, 0, None, 0.0), (1000, 20, 500, 0.1),
                                         (37, 3, None, 0.5), (50, 5, 50, 0.1)])
def test_wsd_matches_the_closed_form(T, W, start, m):
    corner = (4 * T) // 5 if start is None else start  # default: the decay is the last 20%
    for t in range(T):  # the steps a run takes
        got = lr_at(t, lr=3e-3, max_steps=T, schedule="wsd", warmup_steps=W, min_lr_ratio=m, decay_start=start)
        assert got == pytest.approx(reference(t, 3e-3, T, W, corner, m), rel=1e-12, abs=1e-18), t
    # a few values by hand: S = 100, W = 10, m = 0.1 decays over [80, 100]
    kw = dict(lr=1.0, max_steps=100, schedule="wsd", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(9, **kw) == 1.0 and lr_at(79, **kw) == 1.0 and lr_at(80, **kw) == 1.0
    assert lr_at(90, **kw) == pytest.approx(0.55) and lr_at(100, **kw) == pytest.approx(0.1)


def test_a_constant_run_is_every_branch_before_its_decay():
    """decay_start >= max_steps: no decay; its LRs are every branch's LRs up to that branch's decay."""
    const = [lr_at(t, lr=1.0, max_steps=160, schedule="wsd", warmup_steps=5, decay_start=160) for t in range(160)]
    assert const == [lr_at(t, lr=1.0, max_steps=160, schedule="constant", warmup_steps=5) for t in range(160)]
    for f in (1, 1.25, 1.5, 2):
        T = int(100 * f)
        branch = [lr_at(t, lr=1.0, max_steps=T, schedule="wsd", warmup_steps=5) for t in range(T)]
        assert branch[:(4 * T) // 5] == const[:(4 * T) // 5] and branch[-1] < 0.2


def _cfg(max_steps, decay_start, schedule="wsd"):
    return {"optim": {"schedule": schedule, "decay_start": decay_start, "warmup_steps": 5},
            "trainer": {"max_steps": max_steps}}


def test_decay_start_changes_only_at_or_before_the_decay():
    check_resume_config(_cfg(160, 160), _cfg(100, 80), "ck", "ck", step=80)   # the branch at 0.8 S
    check_resume_config(_cfg(160, 160), _cfg(100, None), "ck", "ck", step=80)  # null: 80% of 100
    check_resume_config(_cfg(100, 80), _cfg(200, 80), "ck", "ck", step=90)    # decay_start kept: max_steps only
    with pytest.raises(ResumeConfigError, match=r"^trainer.resume=ck: .*optim.decay_start \(160 -> 80\).*step 96") as e:
        check_resume_config(_cfg(160, 160), _cfg(100, 80), "ck", "ck", step=96)  # past the new decay start
    assert "\n" not in str(e.value)
    with pytest.raises(ResumeConfigError, match="optim.decay_start"):
        check_resume_config(_cfg(100, 60), _cfg(100, 80), "ck", "ck", step=70)  # already decaying
    with pytest.raises(ResumeConfigError, match="optim.decay_start"):
        check_resume_config(_cfg(160, 160), _cfg(100, 80), "ck", "ck")  # step unknown
    with pytest.raises(ResumeConfigError, match=r"optim.schedule \(cosine -> wsd\)"):
        check_resume_config(_cfg(160, None, "cosine"), _cfg(160, None), "ck", "ck", step=8)


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return {r["step"]: (r["loss"], r["lr"], r.get("val_loss")) for r in map(json.loads, fh)}


def _params(run_dir, step):
    """Every rank's model and optimizer state (local updates keep them in the rank files)."""
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    return [torch.load(d / f"rank{r:05d}.pt", weights_only=False) for r in range(2)]


def _leaves(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}{i}.").items()}
    return {prefix: obj} if isinstance(obj, torch.Tensor) else {}


@pytest.mark.extended  # three training runs compared bitwise: ~28 s; the schedule's math stays in the default tier
def test_decay_branch_from_a_constant_run_equals_the_configured_run_bitwise(pools, tmp_path):
    """2 ranks, DiLoCo H=2 (outer Nesterov state and anchors in the checkpoint): the constant
    run to 12 steps checkpoints at 8; the branch resumes it with the decay over [8, 10]."""
    common = ["experiment=tiny", "dist.nproc=2", "sync=diloco", "sync.local_steps=2", "optim.schedule=wsd",
              "optim.warmup_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=8", "model.dropout=0.1"]
    const, branch, ref = tmp_path / "const", tmp_path / "branch", tmp_path / "ref"
    pools.train(*common, "trainer.max_steps=12", "optim.decay_start=12", f"hydra.run.dir={const}")
    run = pools.train(*common, "trainer.max_steps=10", "optim.decay_start=8", f"hydra.run.dir={branch}",
                      f"trainer.resume={const / 'checkpoints' / 'step_00000008'}")
    assert "at step 8" in run.stdout
    pools.train(*common, "trainer.max_steps=10", f"hydra.run.dir={ref}")  # decay_start null: 8
    got, want, before = _metrics(branch), _metrics(ref), _metrics(const)
    assert sorted(got) == [9, 10] and all(want[s] == got[s] for s in got)
    assert all(want[s] == before[s] for s in range(1, 9))  # the constant run is the reference up to 8
    # metrics row s is step index s - 1: the decay's first step (index 8) still runs at lr
    assert want[10][1] < want[9][1] == before[9][1] and before[12][1] == before[9][1]
    for a, b in zip(_params(branch, 10), _params(ref, 10)):
        flat_a, flat_b = _leaves(a), _leaves(b)
        assert flat_a.keys() == flat_b.keys() and any("model" in k for k in flat_a)
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
