"""Steps to target as a factor k, and the trend of k in steps (issue 35, items 1 and 3).

    python bench/time_to_target.py --trend             # dense's curve, then the rows' branches; the table
    python bench/time_to_target.py --trend --report    # the table from the cached runs only

**k = S / D(L)**: L is a method's val loss after S steps; D(L) is the number of steps dense DDP
needs to reach L, read off dense's WSD decay-branch curve (each branch's end point: steps n_i,
val loss L_i), interpolated linearly in log steps between the two branches that bracket L
(:func:`dense_steps`). k = 1: as good as dense; k = 1.3: the method needs 1.3x dense's steps
(the metric of DiLoCo's scaling-law study, Charles et al. 2025, arXiv 2503.09799, which
compares methods by the compute each needs to reach a loss). A loss below dense's best branch
or above its first is not extrapolated: k is then only bounded (:func:`k_factor`).

The trend protocol (``time_to_target.py``'s branches chosen per row, ``--branches``): one WSD
trunk at constant LR to 0.8 x the last branch end, checkpointed at every branch start; each
branch resumes the trunk at 0.8 n and decays linearly to 0 at n (bitwise the run configured
with that decay from the start, ``tests/test_schedule.py``). Dense's branches
(``DENSE_ENDS``) give its curve D(L); each row's (``ENDS``) give its L at S = 1200, 2400,
4800 and so k(S). The issue's goal: k(4800) <= k(1200) - 0.10 (the local-update gap closes
with steps, as the literature finds it does with scale).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

DENSE_ENDS = (300, 450, 600, 900, 1200, 1800, 2400, 3600, 4800)   # dense's curve D(L)
ENDS = (1200, 2400, 4800)                                         # the rows' S
TREND_ROWS = ("local H=8", "sparseloco H=15", "stream H=8 F=4 tau=1")  # the catalogue's rows, in run order
GOAL = 0.10  # k(4800) <= k(1200) - GOAL
BASE_BATCH = 8  # the harness's per-rank batch (catalogue.MODEL's data.batch_size)


# -- the arithmetic (pure; tests/test_steps_trend.py) -----------------------------------------------
def dense_steps(curve: dict, loss: float) -> tuple[Optional[float], str]:
    """``(D, how)``: the steps dense needs to reach ``loss``, from its branch end points
    ``curve = {steps: val loss}``. In increasing steps, the first branch n_i with L_i <= loss
    and the one before it (n_{i-1}, L_{i-1} > loss): log D = log n_{i-1} + (L_{i-1} - loss) /
    (L_{i-1} - L_i) (log n_i - log n_{i-1}). ``loss`` above the first branch's: ``(None,
    'above')`` (D < its steps); no branch reaching it: ``(None, 'below')`` (D > the last's)."""
    pts = sorted((n, v) for n, v in curve.items() if v is not None)
    if not pts:
        return None, "no curve"
    if loss > pts[0][1]:
        return None, "above"
    if loss == pts[0][1]:
        return float(pts[0][0]), "exact"
    for (n0, l0), (n1, l1) in zip(pts, pts[1:]):
        if l1 <= loss:  # l0 > loss: the previous pair did not reach it
            t = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), "interpolated"
    return None, "below"


def k_factor(S: int, curve: dict, loss: Optional[float]) -> tuple[Optional[float], str]:
    """``(k, text)``: k = S / D(loss) and its cell. Out of the curve's range k is only
    bounded: ``> S / n_first`` when ``loss`` is above dense's first branch (dense gets there in
    fewer steps than the curve resolves), ``< S / n_last`` when below its best."""
    if loss is None:
        return None, ""
    d, how = dense_steps(curve, loss)
    if d is not None:
        return S / d, f"{S / d:.2f}"
    ns = sorted(n for n, v in curve.items() if v is not None)
    if not ns:
        return None, "no dense curve"
    if how == "above":
        return None, f"> {S / ns[0]:.2f} (> range)"
    return None, f"< {S / ns[-1]:.2f} (< range)"


def goal(k1: Optional[float], k2: Optional[float]) -> str:
    """The issue's goal cell for k(first S) = ``k1`` and k(last S) = ``k2``."""
    if k1 is None or k2 is None:
        return "not measured (k out of range or not run)"
    verdict = "met" if k2 <= k1 - GOAL + 1e-12 else "MISSED"
    return f"{verdict}: k falls by {k1 - k2:+.2f} (goal >= {GOAL:.2f})"


# -- the trend in batch at equal tokens (item 4) -------------------------------------------------
def batch_ends(batch: int) -> tuple[tuple, tuple]:
    """``(dense's ends, the rows' ends)`` at ``batch`` per rank: the rows' one S is the base
    study's last (``ENDS[-1]``) x BASE_BATCH / batch, the same tokens; dense's curve ends at S/4,
    S/2, 3S/4 and S (trunk to 0.8 S). At 32: S = 1200, dense 300, 600, 900, 1200."""
    S = Fraction(ENDS[-1] * BASE_BATCH, batch)
    dense = [S * i / 4 for i in (1, 2, 3, 4)]
    if any(n.denominator != 1 for n in dense):
        raise ValueError(f"--batch={batch}: {ENDS[-1]} x {BASE_BATCH} / {batch} / 4 must be a whole step")
    return tuple(int(n) for n in dense), (int(S),)


def study(a) -> tuple[tuple, tuple, str]:
    """``(dense's ends, the rows' ends, the results' stem)``: the trend in steps, or with
    ``--batch`` (other than BASE_BATCH) the trend in batch (:func:`batch_ends`, batch_trend.*)."""
    batch = getattr(a, "batch", None)
    if batch is None or batch == BASE_BATCH:
        return DENSE_ENDS, ENDS, "steps_trend"
    return (*batch_ends(batch), "batch_trend")


def gap_cell(k_big: Optional[float], k_base: Optional[float]) -> str:
    """Whether the local-update gap shrinks at the larger batch: k there against k at the
    base batch with the same tokens."""
    if k_big is None or k_base is None:
        return "not measured"
    return f"{'shrinks' if k_big < k_base else 'does not shrink'}: k {k_base:.2f} -> {k_big:.2f} ({k_big - k_base:+.2f})"


def pct(loss: Optional[float], ref: Optional[float]) -> str:
    return "-" if loss is None or ref is None else f"{100 * (loss / ref - 1):+.2f}%"


def batch_table(res: dict, a, base: dict) -> str:
    """The batch study's table: each row at ``a.batch`` (k against dense's curve at that batch)
    beside the base batch's ``base`` (steps_trend.json's doc) at the same steps and the same tokens."""
    from .catalogue import MODEL

    dense_ends, (S,), _ = study(a)
    block = int(next(o.split("=")[1] for o in MODEL if o.startswith("model.block_size=")))
    S0, tokens = ENDS[-1], a.batch * block * a.nproc
    dense = res["dense"]
    bval, bk = base.get("val_loss", {}), base.get("k", {})
    lines = [f"{a.nproc} ranks, seed {a.seed}, batch {a.batch} per rank ({tokens} tokens per step, "
             f"{a.batch / BASE_BATCH:g}x the base batch of {BASE_BATCH}) for {S} steps: the tokens of {S0} steps at "
             f"the base batch. AdamW lr {a.lr}, the base batch's (not retuned: a larger batch usually wants a larger "
             f"LR), wsd (20 warm-up steps, constant LR, linear decay over each branch's last 20%), val loss on 64 "
             f"fixed batches. Dense's curve at batch {a.batch}: branches ending at {', '.join(map(str, dense_ends))} "
             f"steps (trunk constant to {4 * max(dense_ends) // 5}); k = S / D(L) against it. The base batch's "
             f"columns: steps_trend.json (dense's own curve at batch {BASE_BATCH}).", "",
             f"Dense's curve at batch {a.batch}: " + ", ".join(f"{n}: {'-' if v is None else f'{v:.4f}'}"
                                                              for n, v in sorted(dense.items())), "",
             f"| row | val, batch {a.batch}, {S} steps | vs dense | k, batch {a.batch} | k({S}), batch {BASE_BATCH} "
             f"(equal steps) | val, batch {BASE_BATCH}, {S0} steps | vs dense | k({S0}), batch {BASE_BATCH} "
             f"(equal tokens) | the gap at equal tokens |", "|---|" + "---|" * 8]
    for row, losses in res.items():
        k, cell = k_factor(S, dense, losses.get(S))
        b = bval.get(row, {})
        k_eq = bk.get(row, {}).get(str(S))
        k_tok = bk.get(row, {}).get(str(S0))
        lines.append(f"| {row} | {'-' if losses.get(S) is None else f'{losses[S]:.4f}'} | "
                     f"{pct(losses.get(S), dense.get(S)) if row != 'dense' else ''} | {cell or '-'} | "
                     f"{'-' if k_eq is None else f'{k_eq:.2f}'} | "
                     f"{'-' if b.get(str(S0)) is None else f'{b[str(S0)]:.4f}'} | "
                     f"{pct(b.get(str(S0)), bval.get('dense', {}).get(str(S0))) if row != 'dense' else ''} | "
                     f"{'-' if k_tok is None else f'{k_tok:.2f}'} | "
                     f"{'(the reference)' if row == 'dense' else gap_cell(k, k_tok)} |")
    return "\n".join(lines)


# -- the runs and the table ---------------------------------------------------------------------
def curves(a, names: list[str]) -> dict:
    """``{row: {end: val loss}}``: dense's branches, then each row's (:func:`study`; run unless
    cached or ``a.report``), one row at a time."""
    import argparse

    from .time_to_target import protocol

    dense_ends, row_ends, _ = study(a)
    out = {}
    for row in ["dense", *[r for r in names if r != "dense"]]:
        ends = dense_ends if row == "dense" else row_ends
        out[row] = protocol(row, a.seed, argparse.Namespace(**{**vars(a), "branches": list(ends)}))
    return out


def table(res: dict, a) -> str:
    dense = res["dense"]
    lines = [f"{a.nproc} ranks, seed {a.seed}, AdamW lr {a.lr} with wsd (20 warm-up steps, constant LR, linear "
             f"decay over each branch's last 20%), val loss on 64 fixed batches. Dense's curve D(L): branches "
             f"ending at {', '.join(map(str, DENSE_ENDS))} steps (trunk constant to {4 * max(DENSE_ENDS) // 5}); "
             f"k = S / D(L), D interpolated linearly in log steps between the two branches that bracket L.", "",
             "Dense's curve: " + ", ".join(f"{n}: {'-' if v is None else f'{v:.4f}'}" for n, v in sorted(dense.items())),
             "", "| row | " + " | ".join(f"val S={s}" for s in ENDS) + " | " + " | ".join(f"k({s})" for s in ENDS)
             + f" | goal k({ENDS[-1]}) <= k({ENDS[0]}) - {GOAL:.2f} |", "|---|" + "---|" * (2 * len(ENDS) + 1)]
    for row, losses in res.items():
        ks = [k_factor(s, dense, losses.get(s)) for s in ENDS]
        vals = ["-" if losses.get(s) is None else f"{losses[s]:.4f}" for s in ENDS]
        lines.append(f"| {row} | " + " | ".join(vals) + " | " + " | ".join(t or "-" for _, t in ks)
                     + f" | {'(the reference)' if row == 'dense' else goal(ks[0][0], ks[-1][0])} |")
    return "\n".join(lines)


def run_trend(a, names: list[str], argv) -> int:
    """``--trend``: the runs (or the cache, ``--report``), the table in
    bench/results/quality/steps_trend.{md,json} (``--batch``: batch_trend.{md,json})."""
    import os
    import sys

    from . import RESULTS, manifest
    from .catalogue import ROWS, period
    from .time_to_target import check_multiple

    try:
        dense_ends, row_ends, stem = study(a)
        for r in names:
            if r not in ROWS:
                raise SystemExit(f"--rows: unknown row {r!r} (the catalogue, bench/harness/catalogue.py)")
            check_multiple(0, period(r), ends=dense_ends if r == "dense" else row_ends)
    except ValueError as e:  # before any run: one line, exit 2
        print(e, file=sys.stderr)
        return 2
    res = curves(a, names)
    out = os.path.join(RESULTS, "quality")
    if stem == "batch_trend":
        base = _load(os.path.join(out, "steps_trend.json"))
        text = batch_table(res, a, base)
    else:
        text = table(res, a)
    print(text)
    ks = {r: {s: k_factor(s, res["dense"], v.get(s)) for s in row_ends} for r, v in res.items()}
    doc = {"args": vars(a), "dense_ends": list(dense_ends), "ends": list(row_ends),
           "val_loss": {r: {str(n): v for n, v in c.items()} for r, c in res.items()},
           "k": {r: {str(s): k for s, (k, _) in v.items()} for r, v in ks.items()},
           "k_cell": {r: {str(s): t for s, (_, t) in v.items()} for r, v in ks.items()}}
    manifest.write(os.path.join(out, f"{stem}.json"), doc, "bench/time_to_target.py", argv)
    manifest.write(os.path.join(out, f"{stem}.md"), text + "\n", "bench/time_to_target.py", argv)
    return 0


def _load(path: str) -> dict:
    import json
    import os

    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


# -- k beside val-loss % in the quality harness's tables (item 1) -------------------------------
K_HEAD = "k (seed 0)"


def dense_curve(path: Optional[str] = None) -> dict:
    """Dense's seed-0 WSD curve ``{steps: val loss}`` from ``steps_trend.json`` (written by
    ``--trend``); {} when it is not there yet."""
    import os

    from . import RESULTS

    doc = _load(path or os.path.join(RESULTS, "quality", "steps_trend.json"))
    return {int(n): v for n, v in doc["val_loss"]["dense"].items() if v is not None} if doc else {}


def k_cell(per_seed: dict, steps: int, curve: dict) -> str:
    """A quality row's k: its seed-0 val loss after ``steps`` against dense's seed-0 curve
    (paired as the harness pairs seeds); '-' without seed 0 or without a curve."""
    rec = per_seed.get(0, per_seed.get("0"))
    if rec is None or not curve:
        return "-"
    return k_factor(steps, curve, rec["val_loss"])[1]


def with_k(md: str, results: dict, steps: int, curve: dict) -> str:
    """``md`` (a quality table, bench/harness/quality.py's ``report``) with the column
    ``K_HEAD`` after 'vs dense' (replaced if there already), each row's from ``results``
    (``{row: {seed: {"val_loss": ...}}}``); other lines unchanged."""
    from .tables import md_row

    out, col, has = [], None, False
    for line in md.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            col = col if line.strip() else None  # a blank line ends the table
            out.append(line)
            continue
        if "vs dense" in cells:  # a header: the column goes after 'vs dense'
            col = cells.index("vs dense") + 1
            has = cells[col:col + 1] == [K_HEAD]
            new = K_HEAD
        elif col is None:
            out.append(line)
            continue
        elif all(c and set(c) <= set("-") for c in cells):
            new = "---"
        else:
            new = k_cell(results[cells[0]], steps, curve) if cells[0] in results else "-"
        cells[col:col + has] = [new]
        out.append("|" + "|".join(cells) + "|" if new == "---" else md_row(*cells))
    return "\n".join(out)
