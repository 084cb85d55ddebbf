"""Which error feedback should I use? Val loss after 1000 and 2000 steps of the tiny
char-GPT on Shakespeare (2 workers, gloo, the real trainer), per feedback x Top-K density
x optimizer, against the dense (uncompressed) run of the same optimizer.

    python bench/ef_quality.py                 # full table (~20 min on 2 cores)
    python bench/ef_quality.py --steps 1000 --quick

Writes bench/results/ef_quality.{json,md}. Settings per method are the ones in the
README's guide (EF21: dense initial round; EControl: eta = 0.05, dense initial round).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from harness import manifest, runs

OPTIMIZERS = {
    "adamw": ["optim=adamw", "optim.lr=3e-3", "optim.weight_decay=0.0", "optim.grad_clip=0"],
    "sgd": ["optim=sgd", "optim.lr=0.3", "optim.momentum=0.9", "optim.grad_clip=0"],
}
METHODS = {
    "none": ["comm.feedback=none"],
    "ef": ["comm.feedback=ef"],
    "ef21": ["comm.feedback=ef21"],
    "ef21m": ["comm.feedback=ef21m", "comm.eta=0.1"],
    "econtrol": ["comm.feedback=econtrol", "comm.eta=0.05"],
}


def run(overrides: list[str], steps: int) -> dict[int, float]:
    """Run the trainer; return {step: val_loss}."""
    with tempfile.TemporaryDirectory() as d:
        rows = runs.train(["experiment=tiny", f"trainer.max_steps={steps}", "trainer.eval_every=1000",
                           f"trainer.checkpoint_every={steps}", "data.eval_batches=32", "optim.warmup_steps=20",
                           "dist.nproc=2", *overrides], d)
        return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="only density 1%% and AdamW")
    ap.add_argument("--optims", default="adamw,sgd")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    densities = [0.01] if args.quick else [0.01, 0.1]
    optims = ["adamw"] if args.quick else args.optims.split(",")
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    rows = []
    for opt in optims:
        t0 = time.time()
        dense = run(OPTIMIZERS[opt], args.steps)
        rows.append({"optim": opt, "method": "dense", "density": 1.0, "val": dense, "s": time.time() - t0})
        print(f"{opt} dense {dense}", flush=True)
        for density in densities:
            for method, extra in methods.items():
                t0 = time.time()
                val = run([*OPTIMIZERS[opt], "comm=topk", f"comm.ratio={density}", *extra], args.steps)
                rows.append({"optim": opt, "method": method, "density": density, "val": val, "s": time.time() - t0})
                print(f"{opt} {method} {density} {val}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    manifest.write(os.path.join(args.out, f"ef_quality{args.tag}.json"), rows, "bench/ef_quality.py")
    steps = sorted({s for r in rows for s in r["val"]})
    lines = ["| optimizer | feedback | density | " + " | ".join(f"val@{s}" for s in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for r in rows:
        base = next(x for x in rows if x["optim"] == r["optim"] and x["method"] == "dense")["val"]
        cells = [f"{r['val'][s]:.3f} ({100 * (r['val'][s] / base[s] - 1):+.1f}%)" if r["method"] != "dense"
                 else f"{r['val'][s]:.3f}" for s in steps]
        dens = "-" if r["method"] == "dense" else f"{r['density']:.0%}"
        lines.append(f"| {r['optim']} | {r['method']} | {dens} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    manifest.write(os.path.join(args.out, f"ef_quality{args.tag}.md"), table + "\n", "bench/ef_quality.py")
    print(table)


if __name__ == "__main__":
    main()
