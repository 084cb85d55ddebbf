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
