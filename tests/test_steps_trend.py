"""Steps to target as k = S / D(L) (``bench/harness/steps_trend.py``), without training: D
interpolated in log steps between dense's branches, the bounds out of range, the goal's
verdict, the per-row branch points of ``--trend`` and the k column of the quality tables."""
import math

import pytest

from bench.harness import steps_trend as st
from bench.harness import time_to_target as ttt
from bench.harness.catalogue import period

CURVE = {300: 2.4, 600: 2.1, 1200: 1.9, 2400: 1.8}


def test_dense_steps_interpolates_in_log_steps():
    # halfway in loss between 600 (2.1) and 1200 (1.9): the geometric mean of the steps
    assert st.dense_steps(CURVE, 2.0) == (pytest.approx(math.sqrt(600 * 1200)), "interpolated")
    # a quarter of the way from 1200 (1.9) to 2400 (1.8): 1200 * 2 ** 0.25
    assert st.dense_steps(CURVE, 1.875)[0] == pytest.approx(1427.0485, rel=1e-6)
    # a branch's own loss: its steps
    assert st.dense_steps(CURVE, 1.9)[0] == pytest.approx(1200)
    assert st.dense_steps(CURVE, 2.4) == (300.0, "exact")
    # out of range: no number
    assert st.dense_steps(CURVE, 2.5) == (None, "above")
    assert st.dense_steps(CURVE, 1.7) == (None, "below")
    # a noisy curve: the first branch that reaches it, from the one before it
    noisy = {300: 2.4, 600: 1.95, 1200: 1.97, 2400: 1.8}
    assert st.dense_steps(noisy, 1.96)[0] == pytest.approx(300 * 2 ** ((2.4 - 1.96) / (2.4 - 1.95)))
    # a branch not run (None) is left out of the curve: 600 (2.1) to 2400 (1.8), a third of the way
    assert st.dense_steps({**CURVE, 1200: None}, 2.0)[0] == pytest.approx(600 * 4 ** (1 / 3))


def test_k_factor_and_its_bounds():
    assert st.k_factor(1200, CURVE, 2.0) == (pytest.approx(math.sqrt(2)), "1.41")  # 1200 / sqrt(600 * 1200)
    assert st.k_factor(1200, CURVE, 1.9)[0] == pytest.approx(1.0)                  # dense's own loss at S: k = 1
    assert st.k_factor(2400, CURVE, 1.9)[0] == pytest.approx(2.0)
    assert st.k_factor(1200, CURVE, 2.5) == (None, "> 4.00 (> range)")   # worse than dense's first branch
    assert st.k_factor(1200, CURVE, 1.7) == (None, "< 0.50 (< range)")   # better than dense's best
    assert st.k_factor(1200, CURVE, None) == (None, "")
    assert st.k_factor(1200, {}, 2.0) == (None, "no dense curve")


def test_goal_verdict():
    assert st.goal(1.30, 1.15).startswith("met: k falls by +0.15")
    assert st.goal(1.30, 1.20).startswith("met")        # exactly 0.10: met
    assert st.goal(1.30, 1.25).startswith("MISSED: k falls by +0.05")
    assert st.goal(1.30, 1.40).startswith("MISSED: k falls by -0.10")
    assert st.goal(None, 1.2).startswith("not measured")


def test_trend_branch_points():
    assert ttt.trend_points([4800, 1200, 2400]) == [(1200, 960, 1200), (2400, 1920, 2400), (4800, 3840, 4800)]
    assert ttt.checkpoint_every(0, pts=ttt.trend_points(st.DENSE_ENDS)) == 120
    for row in st.TREND_ROWS:  # every row's H divides its branch starts, ends and the trunk
        ttt.check_multiple(0, period(row), ends=st.ENDS)
    with pytest.raises(ValueError, match="--branches: step 960 is not a multiple of H=7"):
        ttt.check_multiple(0, 7, ends=st.ENDS)
    with pytest.raises(ValueError, match="0.8 x 1001"):
        ttt.trend_points([1001])


def test_k_column_in_a_quality_table():
    md = ("4 ranks, ...\n\n| row | LR | vs dense | wire |\n|---|---|---|---|\n"
          "| dense | 0.003 |  | 6.0 |\n| local H=8 | 0.003 | +5.00% | 0.75 |\n| other | 0.003 | +1% | 1 |\n\nnote")
    results = {"dense": {"0": {"val_loss": 1.9}}, "local H=8": {0: {"val_loss": 2.0}}, "other": {1: {"val_loss": 2.0}}}
    out = st.with_k(md, results, 1200, CURVE)
    assert out.split("\n") == ["4 ranks, ...", "", "| row | LR | vs dense | k (seed 0) | wire |", "|---|---|---|---|---|",
                               "| dense | 0.003 |  | 1.00 | 6.0 |", "| local H=8 | 0.003 | +5.00% | 1.41 | 0.75 |",
                               "| other | 0.003 | +1% | - | 1 |", "", "note"]
    assert st.with_k(out, results, 1200, CURVE) == out  # a second pass replaces the column


def test_batch_trend_ends_overrides_and_table(capsys):
    import argparse

    # 4x the batch for a quarter of the steps: 1200 steps (the tokens of 4800 at batch 8); dense's curve to 1200
    assert st.batch_ends(32) == ((300, 600, 900, 1200), (1200,))
    assert st.batch_ends(16) == ((600, 1200, 1800, 2400), (2400,))
    with pytest.raises(ValueError, match="--batch=7"):
        st.batch_ends(7)
    a = argparse.Namespace(batch=32, S=960, seed=0, nproc=4, lr=3e-3, report=True)
    assert st.study(a) == ((300, 600, 900, 1200), (1200,), "batch_trend")
    assert st.study(argparse.Namespace(**{**vars(a), "batch": 8}))[2] == "steps_trend"  # the base batch
    assert st.study(argparse.Namespace(**{**vars(a), "batch": None})) == (st.DENSE_ENDS, st.ENDS, "steps_trend")
    # every run of the study gets the batch once, in MODEL's place; the base batch keeps its overrides (cache keys)
    ov = ttt.base("local H=8", 0, a)
    assert [o for o in ov if o.startswith("data.batch_size=")] == ["data.batch_size=32"]
    plain = ttt.base("local H=8", 0, argparse.Namespace(**{**vars(a), "batch": None}))
    assert [o for o in plain if o.startswith("data.batch_size=")] == ["data.batch_size=8"]
    assert ttt.base("local H=8", 0, argparse.Namespace(**{**vars(a), "batch": 8})) == plain
    assert [o for o in ov if o != "data.batch_size=32"] == [o for o in plain if o != "data.batch_size=8"]
    # branch starts 240..960 (checkpoints every 240), all on completed rounds of every trend row's H
    assert ttt.checkpoint_every(0, pts=ttt.trend_points((300, 600, 900, 1200))) == 240
    for row in st.TREND_ROWS:
        ttt.check_multiple(0, period(row), ends=(1200,))
    # the table: k at batch 32 against dense's batch-32 curve, beside the base batch's k at 1200 and 4800
    res = {"dense": {300: 2.4, 600: 2.1, 900: 2.0, 1200: 1.9}, "local H=8": {1200: 2.0}}
    base = {"val_loss": {"dense": {"4800": 1.5}, "local H=8": {"4800": 1.53}},
            "k": {"dense": {"1200": 1.0, "4800": 1.0}, "local H=8": {"1200": 1.31, "4800": 1.17}}}
    rows = st.batch_table(res, a, base).split("\n")[-2:]
    assert rows[0] == "| dense | 1.9000 |  | 1.00 | 1.00 | 1.5000 |  | 1.00 | (the reference) |"
    # D(2.0) = 900 (dense's own branch): k = 1200 / 900
    assert rows[1] == ("| local H=8 | 2.0000 | +5.26% | 1.33 | 1.31 | 1.5300 | +2.00% | 1.17 | "
                       "does not shrink: k 1.17 -> 1.33 (+0.16) |")
    assert st.gap_cell(1.1, 1.17) == "shrinks: k 1.17 -> 1.10 (-0.07)"
    assert st.gap_cell(None, 1.17) == "not measured"
    # bad input: one line, exit 2, before any run
    assert ttt.main(["--trend", "--batch", "7", "--rows", "dense"]) == 2
    assert "--batch=7" in capsys.readouterr().err
    for argv in (["--batch", "32"], ["--trend", "--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            ttt.main(argv)
        assert e.value.code == 2
