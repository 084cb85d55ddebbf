"""``python -m thinwire.elastic.plot RUN_DIR OUT.png``: an elastic run's membership and loss
against steps, from its ``metrics.jsonl`` (``thinwire-train ... elastic=torchft``, or a planned
absence): live replicas per outer round (a step line), the rounds' lost steps shaded, and the
validation loss (and the writing slot's training loss) on a second axis. Needs matplotlib."""
from __future__ import annotations

import json
import os
import sys


def read(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot(run_dir: str, out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = read(run_dir)
    rounds = [r for r in rows if "live_slots" in r]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.step([0] + [r["step"] for r in rounds], [rounds[0]["live_replicas"]] + [r["live_replicas"] for r in rounds],
            where="pre", color="tab:blue", label="live replicas")
    for r in rounds:
        for _, first, last in r["lost_steps"]:
            ax.axvspan(first - 1, last, color="tab:red", alpha=0.12, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("live replicas", color="tab:blue")
    ax.set_ylim(0, max(r["live_replicas"] for r in rounds) + 0.5)
    ax2 = ax.twinx()
    steps = [r for r in rows if "loss" in r and r["loss"] == r["loss"]]
    ax2.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="0.6", lw=0.8, label="train loss (lowest live slot)")
    vals = [r for r in rows if "val_loss" in r]
    ax2.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", color="tab:green", ms=3, label="val loss")
    ax2.set_ylabel("loss")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    ax.set_title(title or os.path.basename(os.path.normpath(run_dir)) + " (shaded: lost steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m thinwire.elastic.plot RUN_DIR OUT.png", file=sys.stderr)
        return 2
    plot(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
