"""``sync=diloco``'s outer lr: null in the preset, taken from the tuned table for the run's H and
replica count (interpolated in log H and log replicas), an explicit lr kept as given."""
import math

import numpy as np
import pytest
import torch

from thinwire import OuterLoop
from thinwire.comm.outer_optimizer import DILOCO_OUTER_LR, outer_spec, tuned_outer_lr
from thinwire.config import ConfigError, compose, validate

NESTEROV = {"_target_": "torch.optim.SGD", "momentum": 0.9, "nesterov": True}


def reference_lr(h: float, m: float) -> float:
    """np.interp over log H within each measured replica count, then over log replicas (clamped ends)."""
    counts = sorted(DILOCO_OUTER_LR)
    per_m = [np.interp(math.log(h), [math.log(x) for x in sorted(DILOCO_OUTER_LR[c])],
                       [DILOCO_OUTER_LR[c][x] for x in sorted(DILOCO_OUTER_LR[c])]) for c in counts]
    return float(np.interp(math.log(m), [math.log(c) for c in counts], per_m))


def test_tuned_lr_at_measured_points_between_and_beyond():
    for m, by_h in DILOCO_OUTER_LR.items():
        for h, lr in by_h.items():
            assert tuned_outer_lr(h, m) == lr
    for h in (1, 4, 8, 10, 11, 15, 20, 30, 64, 500):
        for m in (1, 2, 3, 4, 8, 16):
            assert tuned_outer_lr(h, m) == pytest.approx(reference_lr(h, m), abs=5e-4), (h, m)
    for m, by_h in DILOCO_OUTER_LR.items():  # halfway in log H between two different lrs: their mean
        hs = sorted(by_h)
        for lo, hi in zip(hs, hs[1:]):
            if by_h[lo] != by_h[hi]:
                assert tuned_outer_lr(math.sqrt(lo * hi), m) == pytest.approx((by_h[lo] + by_h[hi]) / 2, abs=5e-4)
    counts = sorted(DILOCO_OUTER_LR)  # halfway in log replicas, at an H both counts measured
    for m0, m1 in zip(counts, counts[1:]):
        for h in set(DILOCO_OUTER_LR[m0]) & set(DILOCO_OUTER_LR[m1]):
            want = (DILOCO_OUTER_LR[m0][h] + DILOCO_OUTER_LR[m1][h]) / 2
            assert tuned_outer_lr(h, math.sqrt(m0 * m1)) == pytest.approx(want, abs=5e-4), (h, m0, m1)


def test_preset_leaves_lr_null_and_other_optimizers_must_give_one():
    cfg = compose(["sync=diloco", "sync.local_steps=15"])
    assert cfg.sync.outer_optim.lr is None and cfg.sync.local_steps == 15
    validate(cfg)  # the preset itself passes
    with pytest.raises(ConfigError, match=r"sync.outer_optim.lr=None: null takes DiLoCo's tuned outer lr"):
        validate(compose(["sync=diloco", "sync.outer_optim.momentum=0.5"]))
    spec, tuned = outer_spec({**NESTEROV, "lr": 0.3}, 15, 4)
    assert spec["lr"] == 0.3 and not tuned


@pytest.mark.parametrize("lr", [None, 0.7])
def test_outer_loop_takes_the_table_or_the_explicit_lr(lr, capsys):
    torch.manual_seed(0)
    with OuterLoop(torch.nn.Linear(3, 2), "local", local_steps=15, outer_optim={**NESTEROV, "lr": lr}) as outer:
        got = outer.strategy.outer.optimizer.param_groups[0]["lr"]
    out = capsys.readouterr().out
    if lr is None:  # one process: one replica
        assert got == tuned_outer_lr(15, 1)
        assert f"thinwire: sync.outer_optim.lr={got:g}: DiLoCo's outer lr for H=15 and 1 replicas" in out
    else:
        assert got == 0.7 and "sync.outer_optim.lr=" not in out


def test_harness_rows_spell_the_recipe_and_one_replica_reports():
    """The sweep's rows (bench/harness/catalogue.py) give every outer setting, so they measure the
    same thing whatever the preset resolves; the harness summarises a one-replica run (no bytes)."""
    from bench.harness.catalogue import DILOCO_HS, DILOCO_OUTER_LRS, ROWS
    from bench.harness.quality import summary

    for h in DILOCO_HS:
        for lr in DILOCO_OUTER_LRS:
            row = ROWS[f"diloco H={h} olr={lr:g}"]
            assert {"sync=diloco", f"sync.local_steps={h}", f"sync.outer_optim.lr={lr}",
                    "sync.outer_optim.momentum=0.9", "sync.outer_optim.nesterov=true"} <= set(row)
    rows = [{"step": 1, "loss": 3.0, "wire_bytes": 0, "dense_bytes": 0},
            {"step": 2, "loss": 2.9, "wire_bytes": 0, "dense_bytes": 0, "val_loss": 2.5}]
    s = summary(rows, 1)
    assert s["val_loss"] == 2.5 and s["curve"] == [(2, 2.5)] and s["wire_B_per_param_step"] == 0.0
