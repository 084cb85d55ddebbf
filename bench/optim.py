"""Optimizer-plugin benchmarks on the pretrained MiniLM + Shakespeare comedy/tragedy lines.

    python bench/optim.py memory              # (1) peak tensor bytes: inference / MeZO / AdamW step
    python bench/optim.py align               # (2a) first-step alignment with full fine-tuning
    python bench/optim.py lora  --steps 60    # (2) LoRA-GA vs LoRA: steps to LoRA's final loss
    python bench/optim.py quality --seconds 120   # (3) MeZO vs AdamW at equal wall time
    python bench/optim.py all                 # everything; writes bench/results/optim.md

(1) Each mode runs in a fresh subprocess. Peak tensor bytes = the bytes of the tensors
alive before the measured call (parameters, buffers) + the highest running sum of the
CPU allocations and frees that torch.profiler(profile_memory=True) records during it
(leaf ``self_cpu_memory_usage`` of every op and the ``[memory]`` events, in time
order). The AdamW step is the first one, so gradients and both moment buffers are
allocated inside the measured window. Allocator caching and Python objects do not count.

(2a) runs in-process on the same model: the cosine between the first plain-SGD step's change of the effective weights W + s B A and minus the full fine-tuning
gradient, on a batch the LoRA-GA estimate did not see, averaged over adapted layers.

(2) and (3) run the real trainer (``python -m thinwire.train``) on one process and read
its metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from harness import manifest, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "results", "optim.md")
BASE = ["experiment=minilm_genre", "dist.nproc=1", "logger=none", "trainer.progress=false",
        "data.batch_size=16", "data.max_length=48"]


# ---- (1) memory ---------------------------------------------------------------------
def peak_during(fn) -> int:
    """Highest running sum of allocation bytes while ``fn`` runs (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    run = peak = 0
    for _, d in deltas:
        run += d
        peak = max(peak, run)
    return peak


def measure(mode: str) -> dict:
    import torch

    from thinwire.data.shakespeare import ShakespeareLines
    from thinwire.models.hf import build_hf_classifier
    from thinwire.optim.plugins import build_optimizer
    from thinwire.config import compose

    torch.manual_seed(0)
    cfg = compose(BASE + ([f"optim={mode}"] if mode in ("mezo", "adamw") else []))
    data = ShakespeareLines(cfg.data.batch_size, cfg.data.max_length, tokenizer=cfg.data.tokenizer)
    model = build_hf_classifier(cfg.model.path, info=data.info, dropout=cfg.model.dropout)
    batch = data.train_batch(0)
    base = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if mode == "inference":
        def fn():
            model.eval()
            with torch.no_grad():
                model(**batch)
    else:
        plugin = build_optimizer(cfg.optim, model, max_steps=10)

        def fn():
            plugin.compute(model, batch)
            plugin.apply(0)
    peak = peak_during(fn)
    return {"mode": mode, "params_bytes": base, "peak_bytes": base + peak}


def memory_table() -> list[str]:
    rows = {}
    for mode in ("inference", "mezo", "adamw"):
        p = subprocess.run([sys.executable, __file__, "_measure", mode], capture_output=True, text=True, cwd=REPO)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        rows[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    inf = rows["inference"]["peak_bytes"]
    lines = ["| step | peak tensor MB | vs inference | vs AdamW |", "|---|---:|---:|---:|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / inf:.2f}x "
                     f"| {r['peak_bytes'] / rows['adamw']['peak_bytes']:.2f}x |")
    lines.append(f"\n(parameters: {rows['inference']['params_bytes'] / 2**20:.1f} MB)")
    return lines


# ---- (2a) first-step alignment ------------------------------------------------------------
def first_step_cosine(variant: str) -> float:
    import copy

    import torch

    from thinwire.data.shakespeare import ShakespeareLines
    from thinwire.models.hf import build_hf_classifier
    from thinwire.optim.peft import apply_peft
    from thinwire.config import compose

    name, ga_init = {"lora": ("lora", "paper"), "lora_ga": ("lora_ga", "paper"),
                     "lora_ga (PEFT init)": ("lora_ga", "peft")}[variant]
    cfg = compose(BASE + [f"peft={name}", "peft.r=8", "peft.modules_to_train=[head]", f"peft.ga_init={ga_init}"])
    data = ShakespeareLines(cfg.data.batch_size, cfg.data.max_length, tokenizer=cfg.data.tokenizer)
    torch.manual_seed(0)
    base = build_hf_classifier(cfg.model.path, info=data.info, dropout=0.0)
    batch = data.train_batch(0)  # the first training batch; the estimate uses batches -1, -2, ...
    full = copy.deepcopy(base)
    full(**batch).backward()
    grads = {n[: -len(".weight")]: p.grad for n, p in full.named_parameters() if p.grad is not None}
    torch.manual_seed(1)
    model = apply_peft(cfg.peft, base, data=data)
    layers = {n[: -len(".base_layer")]: model.get_submodule(n[: -len(".base_layer")])
              for n, _ in model.named_modules() if n.endswith(".base_layer")}

    def effective():
        return {n: (lm.base_layer.weight + lm.scaling["default"] * lm.lora_B["default"].weight
                    @ lm.lora_A["default"].weight).detach().clone() for n, lm in layers.items()}

    before = effective()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch).backward()
    opt.step()
    after = effective()
    cos = [torch.nn.functional.cosine_similarity((after[n] - before[n]).flatten(), -grads[n].flatten(), dim=0)
           for n in layers]
    return float(torch.stack(cos).mean())


def align_table() -> list[str]:
    rows = ["| adapter | cosine(first step, full FT gradient) |", "|---|---:|"]
    for variant in ("lora", "lora_ga", "lora_ga (PEFT init)"):
        rows.append(f"| {variant} | {first_step_cosine(variant):.3f} |")
    return rows


# ---- (2), (3): trainer runs ------------------------------------------------------------
def train(*overrides: str) -> list[dict]:
    return runs.train([*BASE, *overrides], tempfile.mkdtemp(prefix="thinwire-bench-"))


def smooth(records: list[dict], k: int = 10) -> list[float]:
    losses = [r["loss"] for r in records]
    return [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]


def lora_table(steps: int) -> list[str]:
    common = [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}",
              "optim.lr=1e-3", "optim.warmup_steps=0", "peft.r=8", "peft.modules_to_train=[head]"]
    runs = {name: smooth(train(f"peft={name}", *common)) for name in ("lora", "lora_ga")}
    target = runs["lora"][-1]
    reach = next((i + 1 for i, v in enumerate(runs["lora_ga"]) if v <= target), None)
    ratio = f"{reach / steps:.2f}x" if reach else "not reached"
    return ["| adapter | final loss (10-step mean) | steps to LoRA's final loss |", "|---|---:|---:|",
            f"| lora | {runs['lora'][-1]:.4f} | {steps} |",
            f"| lora_ga | {runs['lora_ga'][-1]:.4f} | {reach or '-'} ({ratio}) |"]


def quality_table(seconds: float, probe_steps: int = 5) -> list[str]:
    """Both optimizers get the same wall-time budget: a short probe gives each one's step
    time, then each runs as many steps as fit; the table reports the val loss at the end."""
    rows = ["| optimizer | steps in budget | s/step | final val loss |", "|---|---:|---:|---:|"]
    for name, extra in (("mezo", ["optim=mezo", "optim.lr=1e-5", "optim.zo_eps=1e-3"]),
                        # the encoder's pooler is unused (mean pooling): DDP must be told
                        ("adamw", ["optim=adamw", "optim.lr=5e-5", "engine.find_unused_parameters=true"])):
        probe = train(*extra, f"trainer.max_steps={probe_steps}", f"trainer.eval_every={probe_steps}")
        per_step = sum(r["step_time_s"] for r in probe[1:]) / max(1, len(probe) - 1)
        steps = max(1, int(seconds / per_step))
        recs = train(*extra, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                     f"trainer.checkpoint_every={steps}")
        rows.append(f"| {name} | {steps} | {per_step:.2f} | {recs[-1].get('val_loss', float('nan')):.4f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["memory", "align", "lora", "quality", "all", "_measure"])
    ap.add_argument("mode", nargs="?")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=120.0)
    a = ap.parse_args()
    if a.what == "_measure":
        print(json.dumps(measure(a.mode)))
        return
    parts = []
    if a.what in ("memory", "all"):
        parts += ["### (1) Peak tensor memory, MiniLM, batch 16 x 48 tokens", "", *memory_table(), ""]
    if a.what in ("align", "all"):
        parts += ["### (2a) First-step alignment with full fine-tuning, MiniLM, r 8, held-out batch", "",
                  *align_table(), ""]
    if a.what in ("lora", "all"):
        parts += [f"### (2) LoRA-GA vs LoRA, AdamW lr 1e-3, r 8, {a.steps} steps", "", *lora_table(a.steps), ""]
    if a.what in ("quality", "all"):
        parts += [f"### (3) MeZO vs AdamW at {a.seconds:.0f} s of training", "", *quality_table(a.seconds), ""]
    text = "\n".join(parts)
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "a") as fh:
        fh.write(text + "\n")
    manifest.record([OUT], "bench/optim.py", note="each invocation appends its tables; the entry is the latest's")


if __name__ == "__main__":
    main()
