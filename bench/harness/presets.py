"""Every preset a user can pick, measured: does it learn, what does a step cost in time, and
what does it send, each next to plain data parallelism with a bf16 gradient all-reduce of the
same model and data (``sync=ddp comm=bf16 optim=adamw peft=none``) run in the same invocation.

    python bench/presets.py --quick            # 20 steps per run, 8 eval batches: a smoke check
    python bench/presets.py --steps 200        # longer runs; --presets tiny,digits to pick some
    python bench/presets.py --quick --write    # also writes bench/results/presets_quick.{json,md}
                                               # (presets_<steps>.* without --quick; rows merge by preset)
    python bench/presets.py --shipped --write  # each preset as shipped: final quality, wall time
                                               # (bench/results/presets_shipped.{json,md})
    python bench/presets.py --check-seeds 0,1,2,3,4 --write   # the CI check of the MiniLM presets, per seed
                                               # (bench/results/presets_check.{json,md})

Presets: the quickstart's default config (``default``) and every ``configs/experiment/*.yaml``.
Each runs ``python -m thinwire.train`` on ``--nproc`` local ranks (2: bytes need peers) with its own
settings except the step count (``trainer.max_steps``; evaluations halfway and at the end on
``--eval-batches`` fixed batches). Reported per preset:

- learning: mean training loss of the first and the last five steps, and the final
  ``val_loss`` (``val_accuracy`` for classifiers) next to the untrained model's on the same
  validation batches (classifiers; ``untrained_val``); "learns" = last five below the first five;
- time: median ``step_time_s`` (steps after the first two) of the preset / of the reference
  (which runs at most ``REFERENCE_STEPS`` with 2 eval batches: it is only timed and
  counted, not judged).
  A ratio within one invocation on one machine, not an absolute speed; on a shared machine
  each run's load differs, so read ratios near 1 as "about the same";
- bytes: mean ``wire_bytes`` per step (the meter's data + control traffic; evaluations and
  one-off setup such as LoRA-GA's gradient estimate are counted apart and left out) of the
  preset / of the reference (a bf16 ring all-reduce of every trainable parameter's gradient
  each step plus its 16-byte control packet).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from . import RESULTS, manifest
from .catalogue import REFERENCE, preset_rows
from .runs import train

REFERENCE_STEPS = 30
# a preset that sets keys the reference's groups do not have (MeZO's optim.zo_eps,
# SparseLoCo's sync.local_steps): its reference starts from the preset of the same model and
# data instead (thinwire refuses to delete keys with ~key)
SAME_MODEL = {"minilm_mezo": "minilm_genre", "sparseloco": "default"}


def presets() -> list[str]:
    return list(preset_rows())


def run(preset: str, extra: list[str], steps: int | None, nproc: int, eval_batches: int,
        eval_every: int | None = None, run_dir: str | None = None) -> list[dict]:
    """One training run; its metrics.jsonl rows (evaluations every ``eval_every`` steps,
    default halfway and at the end). ``run_dir``: kept there (default: a temporary one).
    ``steps=None``: the preset's own length, evaluation and checkpoint schedule (as shipped)."""
    schedule = [] if steps is None else [
        f"trainer.max_steps={steps}", f"trainer.eval_every={eval_every or max(1, steps // 2)}",
        f"trainer.checkpoint_every={steps}"]
    with tempfile.TemporaryDirectory() as tmp:
        return train([*preset_rows()[preset], f"dist.nproc={nproc}", *schedule, f"data.eval_batches={eval_batches}",
                      "trainer.sample_chars=0", "trainer.progress=false", "logger=none", *extra], run_dir or tmp)


def shipped(preset: str, nproc: int, eval_batches: int) -> dict:
    """The preset exactly as shipped (its own steps, evaluations, checkpoints; wandb off, no
    sample), with ``eval_batches`` validation batches: its final quality and the wall time a
    user waits, start-up and evaluations included."""
    import time

    t0 = time.perf_counter()
    rows = run(preset, [], None, nproc, eval_batches)
    wall = time.perf_counter() - t0
    r = {"preset": preset, "steps": rows[-1]["step"], "wall_s": wall, "val_loss": rows[-1].get("val_loss"),
         "val_accuracy": rows[-1].get("val_accuracy"), "step_s": summarise(rows)["step_s"]}
    if preset.startswith("minilm"):  # untrained_val builds the MiniLM classifiers
        r["val_untrained"], r["acc_untrained"] = untrained_val(
            [*([] if preset == "default" else [f"experiment={preset}"]), f"data.eval_batches={eval_batches}"])
    return r


def shipped_table(rows: list[dict], nproc: int, eval_batches: int) -> str:
    out = [f"Each preset as shipped, {nproc} ranks on this machine's cores, {eval_batches} validation batches; "
           "wall time from the command to its exit (start-up and evaluations included).\n",
           "| preset | steps | final val_loss (accuracy) | untrained model, same batches | wall time | median step |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "" if r["val_accuracy"] is None else f" ({r['val_accuracy']:.3f})"
        before = "-" if r.get("val_untrained") is None else f"{r['val_untrained']:.3f} ({r['acc_untrained']:.3f})"
        out.append(f"| `{r['preset']}` | {r['steps']} | {r['val_loss']:.3f}{acc} | {before} | "
                   f"{r['wall_s'] / 60:.1f} min | {r['step_s']:.2g} s |")
    return "\n".join(out) + "\n"


def untrained_val(overrides: list[str]) -> tuple[float, float]:
    """(val_loss, val_accuracy) of the model a run of ``overrides`` starts from, as the trainer
    builds it before ``peft`` (the pretrained encoder and its new, random head: a head set by
    ``peft.head_init`` counts as learnt), on the run's validation batches (all of them, one
    rank, eval mode). ``tests/test_presets.py`` checks the MiniLM presets against it."""
    import torch
    from hydra.utils import instantiate

    from thinwire.config import compose

    cfg = compose(overrides)
    data = instantiate(cfg.data, seed=cfg.trainer.seed, rank=0, world_size=1)
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model, info=data.info).eval()
    losses, hits, n = [], 0, 0
    with torch.no_grad():
        for batch in data.eval_batches_for_rank():
            losses.append(float(model(**batch)))
            logits = model.logits(batch["input_ids"], batch["attention_mask"])
            hits += int((logits.argmax(-1) == batch["y"]).sum())
            n += len(batch["y"])
    return sum(losses) / len(losses), hits / n


def fixed_batch_loss(overrides: list[str], steps: int, ranks: int, run_dir: str | None = None,
                     only_rank: int | None = None) -> float:
    """Mean loss, in eval mode, over the training batches that a run of ``overrides`` on ``ranks``
    ranks draws in its first ``steps`` steps (every rank's, or ``only_rank``'s), of the model it
    starts from (as ``untrained_val`` builds it) or, with ``run_dir``, of that run's newest
    checkpoint. The same batches before and after: their loss falls when the run's optimizer
    descends its objective, with none of the batch-to-batch noise of the logged training loss."""
    import torch
    from hydra.utils import instantiate

    from thinwire.config import compose
    from thinwire.trainer.checkpoint import checkpoint_dirs, safe_load

    cfg = compose(overrides)
    shards = [instantiate(cfg.data, seed=cfg.trainer.seed, rank=r, world_size=ranks)
              for r in (range(ranks) if only_rank is None else [only_rank])]
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model, info=shards[0].info)
    if run_dir is not None:
        if cfg.peft.name in ("lora", "lora_ga"):  # the adapters' modules, to load the trained ones into
            from thinwire.optim.lora import inject, lora_config

            model = inject(cfg.peft, model, lora_config(cfg.peft, model, ga=False))
        model.load_state_dict(safe_load(os.path.join(checkpoint_dirs(run_dir)[-1], "common.pt"))["model"])
    model.eval()
    with torch.no_grad():
        losses = [float(model(**shard.train_batch(step))) for shard in shards for step in range(steps)]
    return sum(losses) / len(losses)


def summarise(rows: list[dict]) -> dict:
    losses = [r["loss"] for r in rows]
    last = rows[-1]
    timed = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    return {"steps": len(rows), "first5": statistics.fmean(losses[:5]), "last5": statistics.fmean(losses[-5:]),
            "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
            "step_s": statistics.median(timed), "wire_bytes": statistics.fmean(r["wire_bytes"] for r in rows)}


def measure(preset: str, steps: int, nproc: int, eval_batches: int) -> dict:
    own = summarise(run(preset, [], steps, nproc, eval_batches))
    if own["val_accuracy"] is not None and preset.startswith("minilm"):
        own["val_untrained"] = untrained_val([f"experiment={preset}", f"data.eval_batches={eval_batches}"])[0]
    # the reference only times steps and counts bytes: REFERENCE_STEPS and 2 eval batches are enough
    ref = summarise(run(SAME_MODEL.get(preset, preset), REFERENCE, min(steps, REFERENCE_STEPS), nproc, 2))
    return {"preset": preset, **own, "learns": own["last5"] < own["first5"],
            "time_ratio": own["step_s"] / ref["step_s"], "bytes_ratio": own["wire_bytes"] / ref["wire_bytes"],
            "reference": ref}


# tests/test_presets.py::test_minilm_preset_learns_in_20_steps: 20 steps on 2 ranks; the loss on those
# steps' own training batches before and after (``fixed_batch_loss``); val_loss on 8 fixed validation
# batches is reported next to it. Lines per rank: the preset's own 16, or fewer where the check held
# for every seed with them (CHECK_BATCH: minilm_genre's fall was >= 0.085 with 8, and a step of
# full fine-tuning costs twice as much with 16)
CHECK_STEPS, CHECK_RANKS, CHECK = 20, 2, ["data.eval_batches=8"]
CHECK_BATCH = {"minilm_genre": 8}


def check_args(preset: str) -> list[str]:
    """The overrides of the CI check's run of ``preset``."""
    batch = [f"data.batch_size={CHECK_BATCH[preset]}"] if preset in CHECK_BATCH else []
    return [f"experiment={preset}", *CHECK, *batch]


def check_fall(preset: str, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """The CI check's numbers for one seed (trainer.seed: the random head and the training
    batches; the validation batches are the same for every seed); ``extra``: more overrides."""
    args = [*check_args(preset), f"trainer.seed={seed}", *extra]
    before = fixed_batch_loss(args, CHECK_STEPS, CHECK_RANKS)
    val_before, acc_before = untrained_val(args)
    with tempfile.TemporaryDirectory() as d:
        last = run(preset, args[1:], CHECK_STEPS, CHECK_RANKS, 8, eval_every=CHECK_STEPS, run_dir=d)[-1]
        after = fixed_batch_loss(args, CHECK_STEPS, CHECK_RANKS, run_dir=d)
    batch = next((int(a.split("=")[1]) for a in reversed(args) if a.startswith("data.batch_size=")), 16)
    return {"preset": preset, "seed": seed, "batch": batch, "before": before, "after": after, "fall": before - after,
            "val_before": val_before, "val_after": last["val_loss"], "acc_before": acc_before,
            "acc_after": last["val_accuracy"]}


def check_table(rows: list[dict]) -> str:
    out = ["| preset | lines per rank | seed | loss on the 20 steps' batches: untrained -> after | fall | val_loss "
           "| val_accuracy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['preset']}` | {r.get('batch', 16)} | {r['seed']} | {r['before']:.4f} -> {r['after']:.4f} "
                   f"| {r['fall']:+.4f} "
                   f"| {r['val_before']:.4f} -> {r['val_after']:.4f} | {r['acc_before']:.3f} -> {r['acc_after']:.3f} |")
    by = {}
    for r in rows:
        by.setdefault(r["preset"], []).append(r)
    out.append("")
    for p, rs in by.items():
        f, v = [r["fall"] for r in rs], [r["val_before"] - r["val_after"] for r in rs]
        out.append(f"- `{p}`: fall min {min(f):+.4f}, mean {statistics.fmean(f):+.4f}, max {max(f):+.4f}; "
                   f"val_loss fall min {min(v):+.4f}, max {max(v):+.4f} ({len(f)} seeds)")
    return "\n".join(out) + "\n"


def checks(names: list[str], seeds: list[int], write: bool) -> None:
    stem = os.path.join(RESULTS, "presets_check")
    rows = {}
    if write and os.path.exists(stem + ".json"):  # rows of other presets and seeds stay
        with open(stem + ".json") as fh:
            rows = {(r["preset"], r["seed"]): r for r in json.load(fh)["rows"]}
    for name in names:
        for seed in seeds:
            r = rows[name, seed] = check_fall(name, seed)
            print(check_table([r]).splitlines()[2], flush=True)
    text = check_table(sorted(rows.values(), key=lambda r: (r["preset"], r["seed"])))
    if write:
        write_pair(stem, {"steps": CHECK_STEPS, "overrides": CHECK, "batch": CHECK_BATCH,
                          "rows": sorted(rows.values(), key=lambda r: (r["preset"], r["seed"]))},
                   f"Written by `python bench/presets.py --check-seeds ...` (rows may come from several invocations): "
                   f"the CI check of tests/test_presets.py ({CHECK_STEPS} steps, {CHECK_RANKS} ranks, "
                   f"{' '.join(CHECK)}), once per seed.\n\n{text}")
    print("\n" + text)


def table(rows: list[dict], steps: int, nproc: int) -> str:
    others = "; ".join(f"for `{k}`: `{v}`'s" for k, v in SAME_MODEL.items())
    head = (f"{steps} steps per run, {nproc} ranks. Reference: the same preset ({others}) with "
            f"`{' '.join(REFERENCE)}` (a bf16 gradient all-reduce every step), run right after it.\n\n"
            "| preset | loss first 5 -> last 5 | learns | final val_loss (acc) | step time / reference | "
            "bytes per step / reference |\n|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        if r["val_accuracy"] is not None:
            val += f" ({r['val_accuracy']:.3f})"
        if r.get("val_untrained") is not None:
            val += f" from {r['val_untrained']:.3f}"
        lines.append(f"| `{r['preset']}` | {r['first5']:.3f} -> {r['last5']:.3f} | {'yes' if r['learns'] else 'NO'} "
                     f"| {val} | {r['time_ratio']:.2f}x | {r['bytes_ratio']:.4g}x |")
    return head + "\n".join(lines) + "\n"


def write_pair(stem: str, doc: dict, md: str) -> None:
    """``<stem>.json`` and ``<stem>.md``, with their manifest entries (this invocation's command)."""
    manifest.write(stem + ".json", doc, "bench/presets.py")
    manifest.write(stem + ".md", md, "bench/presets.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps per run (overrides --steps)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=None, help="default 64, 8 with --quick")
    ap.add_argument("--presets", default=None, help="comma-separated (default: all)")
    ap.add_argument("--write", action="store_true", help="write bench/results/presets[_quick].{json,md}")
    ap.add_argument("--shipped", action="store_true",
                    help="each preset as shipped (its own steps): final quality and wall time "
                         "(bench/results/presets_shipped.{json,md})")
    ap.add_argument("--check-seeds", default=None,
                    help="comma-separated seeds: run the CI check of the MiniLM presets (or --presets) per seed")
    a = ap.parse_args()
    steps = 20 if a.quick else a.steps
    eval_batches = a.eval_batches or (8 if a.quick else 64)
    names = a.presets.split(",") if a.presets else presets()
    unknown = sorted(set(names) - set(presets()))
    if unknown:
        sys.exit(f"bench/presets.py: error: --presets: unknown {', '.join(unknown)} (known: {', '.join(presets())})")
    if a.check_seeds is not None:
        try:
            seeds = [int(x) for x in a.check_seeds.split(",")]
        except ValueError:
            sys.exit(f"bench/presets.py: error: --check-seeds={a.check_seeds}: expected comma-separated integers")
        checks([n for n in names if n.startswith("minilm")] if not a.presets else names, seeds, a.write)
        return
    if a.shipped:
        stem, rows = os.path.join(RESULTS, "presets_shipped"), {}
        if a.write and os.path.exists(stem + ".json"):  # rows of other presets stay
            with open(stem + ".json") as fh:
                rows = {r["preset"]: r for r in json.load(fh)["rows"]}
        for name in names:
            rows[name] = shipped(name, a.nproc, eval_batches)
            ordered = [rows[n] for n in presets() if n in rows]
            text = shipped_table(ordered, a.nproc, eval_batches)
            print(text.splitlines()[-1], flush=True)
            if a.write:
                write_pair(stem, {"nproc": a.nproc, "eval_batches": eval_batches, "rows": ordered},
                           f"Written by `python bench/presets.py --shipped` (rows may come from several "
                           f"invocations).\n\n{text}")
        print("\n" + text)
        return
    setting = {"steps": steps, "nproc": a.nproc, "eval_batches": eval_batches}
    stem = os.path.join(RESULTS, "presets_quick" if a.quick else f"presets_{steps}")
    rows = {}
    if a.write and os.path.exists(stem + ".json"):  # rows of other presets measured the same way stay
        with open(stem + ".json") as fh:
            old = json.load(fh)
        if {k: old[k] for k in setting} == setting:
            rows = {r["preset"]: r for r in old["rows"]}
    for name in names:
        rows[name] = measure(name, steps, a.nproc, eval_batches)
        print(table([rows[name]], steps, a.nproc).splitlines()[-1], flush=True)
        ordered = [rows[n] for n in presets() if n in rows]
        text = table(ordered, steps, a.nproc)
        if a.write:  # after every row: a failing preset later keeps the rows measured before it
            write_pair(stem, {**setting, "rows": ordered},
                       f"Written by `python bench/presets.py` ({steps} steps per run, {a.nproc} ranks, "
                       f"{eval_batches} eval batches; rows may come from several invocations).\n\n{text}")
    print("\n" + text)

