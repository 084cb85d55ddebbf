"""``thinwire-report RUN_DIR...``: compare runs from their ``metrics.jsonl`` files.

Writes into ``--out`` (default ``report/``):

- ``loss_vs_step.png``, ``loss_vs_time.png`` (cumulative ``step_time_s``),
  ``loss_vs_wire.png`` (cumulative ``wire_bytes``), each with ``val_loss`` as markers;
- ``throughput.png`` (tokens/s or samples/s per step, and the mean per run) and
  ``wire_per_step.png`` (mean wire bytes per step per run, next to the dense fp32
  all-reduce reference ``dense_bytes``);
- ``summary.md``: one table row per run, ratios against the FIRST run given;
- ``report.html``: one self-contained page (PNGs embedded as base64, the same table).

A RUN_DIR without ``metrics.jsonl`` whose subdirectories hold one (a Hydra sweep,
``multirun/<date>/<time>/0, 1, ...``) stands for those runs. When ``trainer.log_every``
is above 1, each logged line stands for the steps since the previous line, so totals
(time, wire bytes) are extrapolated from the logged steps.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

PROG = "thinwire-report"
PLOTS = (
    ("loss_vs_step.png", "Loss vs step"),
    ("loss_vs_time.png", "Loss vs wall-clock time"),
    ("loss_vs_wire.png", "Loss vs cumulative wire bytes"),
    ("throughput.png", "Throughput"),
    ("wire_per_step.png", "Wire bytes per step"),
)
COLUMNS = ("run", "steps", "final loss", "final val_loss", "total time (s)", "total wire MB",
           "wire bytes/step", "wire vs first", "time vs first")


class ReportError(Exception):
    """A problem with the input: reported as one line, exit status 2."""


@dataclass
class Run:
    path: str
    name: str = ""
    records: list = field(default_factory=list)
    overrides: list = field(default_factory=list)

    # -- per-line series ---------------------------------------------------------
    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records]

    def gaps(self) -> list[int]:
        """How many training steps each line stands for (1 when every step is logged)."""
        out, prev = [], 0
        for s in self.steps():
            out.append(max(s - prev, 1))
            prev = s
        return out

    def cumulative(self, key: str) -> list[float]:
        total, out = 0.0, []
        for r, g in zip(self.records, self.gaps()):
            total += float(r.get(key, 0.0) or 0.0) * g
            out.append(total)
        return out

    @property
    def unit(self) -> str:
        for r in self.records:
            for k in ("tokens_per_s", "samples_per_s"):
                if k in r:
                    return k
        return ""

    # -- summary -----------------------------------------------------------------
    def n_steps(self) -> int:
        return self.steps()[-1] if self.records else 0

    def total(self, key: str) -> float:
        return self.cumulative(key)[-1] if self.records else 0.0

    def final(self, key: str):
        for r in reversed(self.records):
            if r.get(key) is not None:
                return float(r[key])
        return None


# -- input ------------------------------------------------------------------------
def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def expand(run_dir: str) -> list[str]:
    """The run directories that ``run_dir`` stands for: itself, or its sweep members."""
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) or not os.path.isdir(run_dir):
        return [run_dir]
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("checkpoints", "wandb")]
        if "metrics.jsonl" in files and os.path.normpath(root) != os.path.normpath(run_dir):
            found.append(root)
    return sorted(found, key=_natural_key) or [run_dir]


def load(path: str) -> Run:
    """Read ``<path>/metrics.jsonl``; a trailing half-written line (a live run) is dropped."""
    mfile = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(mfile):
        raise ReportError(f"{mfile}: no such file")
    with open(mfile) as fh:
        lines = [(i, ln) for i, ln in enumerate(fh, 1) if ln.strip()]
    records = []
    for k, (lineno, ln) in enumerate(lines):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
                raise ValueError("needs the keys 'step' and 'loss'")
        except ValueError as e:
            if k == len(lines) - 1 and k > 0:
                break  # the run is still writing its last line
            raise ReportError(f"{mfile}:{lineno}: not a metrics line ({str(e).splitlines()[0]})") from None
        records.append(rec)
    if not records:
        raise ReportError(f"{mfile}: empty (no metrics lines)")
    records.sort(key=lambda r: r["step"])
    return Run(path=path, records=records, overrides=_overrides(path))


def _overrides(path: str) -> list[str]:
    """The Hydra overrides a run was started with (``.hydra/overrides.yaml``), if recorded."""
    f = os.path.join(path, ".hydra", "overrides.yaml")
    if not os.path.isfile(f):
        return []
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(OmegaConf.load(f))
    except Exception:  # an unreadable record only loses a table column
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def name_runs(runs: list[Run]) -> None:
    """The directory name, or as many parent components as it takes to be unique."""
    parts = [os.path.normpath(os.path.abspath(r.path)).split(os.sep) for r in runs]
    depth = [1] * len(runs)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for r, n in zip(runs, names):  # the same directory given twice
        seen[n] = seen.get(n, 0) + 1
        r.name = n if seen[n] == 1 else f"{n} ({seen[n]})"


# -- summary ------------------------------------------------------------------------
def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def summary_rows(runs: list[Run]) -> list[list[str]]:
    first_wire, first_time = runs[0].total("wire_bytes"), runs[0].total("step_time_s")
    rows = []
    for r in runs:
        wire, t, n = r.total("wire_bytes"), r.total("step_time_s"), r.n_steps()
        rows.append([
            r.name, str(n), _fmt(r.final("loss")), _fmt(r.final("val_loss")), _fmt(t, 2),
            _fmt(wire / 1e6, 3), str(round(wire / n)) if n else "-",
            _fmt(wire / first_wire, 3) if first_wire > 0 else "-",
            _fmt(t / first_time, 3) if first_time > 0 else "-",
        ])
    return rows


def _with_overrides(runs: list[Run], columns, rows):
    """An ``overrides`` column: what each run was started with, less what all runs share."""
    if not any(r.overrides for r in runs):
        return list(columns), rows
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    cells = [" ".join(o for o in r.overrides if o not in common) for r in runs]
    return list(columns) + ["overrides"], [row + [c] for row, c in zip(rows, cells)]


def markdown_table(columns, rows) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f'<table class="summary">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>'


# -- plots -------------------------------------------------------------------------
def _plot_loss(plt, runs: list[Run], xkey: str, xlabel: str, path: str, logx: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        if xkey == "step":
            x = r.steps()
        elif xkey == "wire_bytes":
            x = [v / 1e6 for v in r.cumulative(xkey)]
        else:
            x = r.cumulative(xkey)
        ax.plot(x, [float(rec["loss"]) for rec in r.records], color=color, lw=1.2, label=r.name)
        ev = [(xi, float(rec["val_loss"])) for xi, rec in zip(x, r.records) if rec.get("val_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), "o", color=color, ms=5, mec="black", mew=0.5,
                    label=f"{r.name} (val_loss)")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(plt, runs: list[Run], path: str) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names, means, colors = [], [], []
    units = sorted({r.unit for r in runs if r.unit})
    for i, r in enumerate(runs):
        u = r.unit
        if not u:
            continue
        pts = [(int(rec["step"]), float(rec[u])) for rec in r.records if rec.get(u) is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), color=f"C{i % 10}", lw=1, label=r.name)
        names.append(r.name)
        means.append(sum(p[1] for p in pts) / len(pts))
        colors.append(f"C{i % 10}")
    label = " or ".join(u.replace("_per_s", "/s") for u in units) or "items/s"
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize="small")
    bx.bar(range(len(names)), means, color=colors)
    bx.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
    bx.set_ylabel(f"mean {label}")
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_wire(plt, runs: list[Run], path: str) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 3), 4.5))
    x = list(range(len(runs)))
    wire = [r.total("wire_bytes") / max(r.n_steps(), 1) for r in runs]
    dense = [r.total("dense_bytes") / max(r.n_steps(), 1) for r in runs]
    w = 0.38
    ax.bar([i - w / 2 for i in x], wire, w, color=[f"C{i % 10}" for i in x], label="wire bytes/step (sent)")
    ax.bar([i + w / 2 for i in x], dense, w, color="lightgray", hatch="//", edgecolor="gray",
           label="dense fp32 all-reduce bytes/step")
    if all(v > 0 for v in wire + dense) and max(wire + dense) / min(wire + dense) > 20:
        ax.set_yscale("log")
    ax.set_xticks(x, [r.name for r in runs], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("bytes per step (rank 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_plots(runs: list[Run], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    totals = [r.total("wire_bytes") for r in runs]
    logx = all(t > 0 for t in totals) and max(totals) / min(totals) > 20
    paths = [os.path.join(out, f) for f, _ in PLOTS]
    _plot_loss(plt, runs, "step", "step", paths[0])
    _plot_loss(plt, runs, "step_time_s", "wall-clock time (s, cumulative step_time_s)", paths[1])
    _plot_loss(plt, runs, "wire_bytes", "cumulative wire MB (rank 0)", paths[2], logx=logx)
    _plot_throughput(plt, runs, paths[3])
    _plot_wire(plt, runs, paths[4])
    return paths


# -- output ------------------------------------------------------------------------
HTML_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table.summary{border-collapse:collapse;font-size:0.9em}
table.summary th,table.summary td{border:1px solid #ccc;padding:4px 8px;text-align:right}
table.summary td:first-child,table.summary th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#555;font-size:0.9em}"""


def write_html(path: str, title: str, runs: list[Run], table: str, plots: list[str]) -> None:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             "<h2>Summary</h2>", table,
             '<p class="note">Totals are summed over the logged steps (rank 0). Ratios are against the '
             f"first run, <b>{html.escape(runs[0].name)}</b>. Wire bytes are what rank 0 sent, counted "
             "by the standard algorithm of each collective.</p>",
             "<h2>Runs</h2><ul>"]
    parts += [f"<li><b>{html.escape(r.name)}</b>: <code>{html.escape(os.path.abspath(r.path))}</code></li>"
              for r in runs]
    parts.append("</ul>")
    for p, (_, heading) in zip(plots, PLOTS):
        with open(p, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        parts.append(f"<h2>{html.escape(heading)}</h2>\n"
                     f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>\n")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Compare thinwire runs: plots, a summary table and one HTML page.",
        epilog="A RUN_DIR without metrics.jsonl stands for its subdirectories that have one "
               "(a Hydra sweep: multirun/<date>/<time>). Ratios are against the first run.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl, or a sweep")
    p.add_argument("--out", default="report", metavar="DIR", help="output directory (default: report/ in the cwd)")
    p.add_argument("--title", default="thinwire report", help="title of the HTML page")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config.rules import missing_module

    if missing_module("matplotlib"):
        print(f"{PROG}: error: the plots need matplotlib, which is not installed; install it with: "
              f"pip install 'thinwire[plots]'", file=sys.stderr)
        return 2
    try:
        runs = [load(d) for rd in args.run_dirs for d in expand(rd)]
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    name_runs(runs)
    os.makedirs(args.out, exist_ok=True)
    plots = render_plots(runs, args.out)
    columns, rows = _with_overrides(runs, COLUMNS, summary_rows(runs))
    md = os.path.join(args.out, "summary.md")
    with open(md, "w") as fh:
        fh.write(f"# {args.title}\n\nRatios are against the first run, `{runs[0].name}`.\n\n")
        fh.write(markdown_table(columns, rows))
    page = os.path.join(args.out, "report.html")
    write_html(page, args.title, runs, html_table(columns, rows), plots)
    print(markdown_table(columns, rows), end="")
    print(f"{PROG}: {len(runs)} run(s) -> {page}, {md}, {len(plots)} PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
