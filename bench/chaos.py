"""The chaos drill (issue 36): many short trainings with faults drawn from a seeded schedule,
each run's end state checked bitwise against its fault-free reference.

    python bench/chaos.py --faults 100 --seed 0 --runs-dir /work/qruns

A run is one family's config (``FAMILIES``: 2 ranks, the tests' tiny char-GPT, dropout on, 24
steps, a checkpoint every 4) trained in several launches of ``thinwire-train ... dist.nproc=2
dist.max_restarts=1`` in one run dir, ``trainer.resume=auto`` from the second on. Faults, drawn
by the seed, go into the launches in sequence (several per run, one launch recovering from the
previous one's; a launch takes the first of the next ``LOOK`` drawn faults that fits it):

- ``kill``: SIGKILL of a rank after a step (``trainer.faults.kill_at``): torch elastic restarts
  the workers, which resume from the newest checkpoint;
- ``stop``: SIGSTOP of a rank (``trainer.faults.stop_at``): its peer times out after
  ``dist.timeout_s``, the launcher kills the frozen worker and restarts both;
- ``ckpt_fail``: that rank's checkpoint write fails with ENOSPC inside the atomic writer
  (``trainer.faults.ckpt_fail_at``): the job fails, restarts from the previous checkpoint;
- ``nan``: NaN gradients on a rank in one step (``trainer.faults.nan_at``, with
  ``nan_in_restarts``: a bad batch recurs whenever its step is redone), which every rank skips;
- ``corrupt``: between launches the newest checkpoint's ``common.pt`` or a rank file is
  truncated; the next launch falls back to the checkpoint before it;
- ``ctrl_c``: SIGINT to the launcher once the metrics reach a step; the run stops with a
  checkpoint (exit 130) and the next launch resumes it.

The steps of each launch's faults are drawn relative to the step it resumes from (a Ctrl-C
stops at the next step, or the next synchronisation under local updates, so later steps
depend on timing; the kinds and their order do not). A launch ends with the run, with its
Ctrl-C, or (to leave room for the next faults) with ``trainer.stop_after``, which is no fault.

**The check.** The reference is the same config run once, uninterrupted, without faults
(with the run's ``nan_at`` if it drew one: a skipped step is skipped in any run). A run's end
state equals it when every metrics line (step, loss, val loss) and every tensor of the final
checkpoint (``common.pt`` and each rank's file: parameters, optimizer, error-feedback and
outer state, RNG states) are bitwise equal, as tests/test_ctrl_c.py compares them. A fault
counts as survived when its launch ended as it should (exit 0, or 130 after Ctrl-C; for a
kill, stop or failed write a restart that resumed; for a corrupt checkpoint the fall-back to
the newest one the drill has not torn, ``usable_steps``) and
the run reached its last step. Steps redone: the steps between the checkpoint resumed from and
the last step reached before the fault. ``--faults`` is a lower bound: the last run finishes.

Elastic faults (``elastic=torchft``): ``python bench/chaos.py --elastic`` runs the cases of
``bench/chaos_elastic.py`` instead (a slot SIGKILLed mid-round, SIGKILLed inside the outer
collective, SIGSTOPped beyond the grace window and continued), each against its planned-absence
reference, into ``<out>_elastic.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque

import torch

from harness import REPO, RESULTS, manifest, runs

STEPS, EVERY = 24, 4
TINY = ["experiment=tiny"]
FAMILIES = {
    "ddp+topk-ef": [*TINY, "comm=topk", "comm.ratio=0.05", "comm.feedback=ef", "comm.min_numel=256"],
    "diloco": [*TINY, "sync=diloco", "sync.local_steps=4"],
    "co2": [*TINY, "sync=co2", "sync.local_steps=3"],
    "streaming": [*TINY, "sync=local", "sync.local_steps=4", "sync.fragments=2"],
    "sparseloco": ["experiment=sparseloco", "model.n_layer=2", "model.n_embd=64", "model.n_head=2",
                   "model.block_size=32", "data.batch_size=8", "sync.local_steps=4"],
}
KINDS = ("kill", "stop", "ckpt_fail", "nan", "corrupt", "ctrl_c")
LOOK = 3  # a launch takes a fault from this many drawn next
TERMINAL = {"kill": "kill_at", "stop": "stop_at", "ckpt_fail": "ckpt_fail_at"}  # end a launch's first attempt


def common(timeout_s: float) -> list[str]:
    return ["dist.nproc=2", "model.dropout=0.1", "logger=none", "trainer.progress=false", "trainer.sample_chars=0",
            f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={EVERY}", f"trainer.eval_every={STEPS}",
            "trainer.keep_checkpoints=0", "dist.max_restarts=1", f"dist.timeout_s={timeout_s:g}"]


# torch's launcher gives a worker that ignores SIGTERM 30 s before its SIGKILL (ProcessContext.join's
# grace period, hard-coded); a SIGSTOPped worker never acts on SIGTERM. The drill's launcher gives it
# 1 s (as tests/test_reliability.py's hung-peer test does), so a stop costs dist.timeout_s, not 30 s more.
LAUNCHER = """
import sys
from torch.multiprocessing.spawn import ProcessContext
_join = ProcessContext.join
def _join_with_short_grace(self, timeout=None, grace_period=None):
    return _join(self, timeout=timeout, grace_period=1.0 if grace_period is None else grace_period)
ProcessContext.join = _join_with_short_grace
from thinwire.train import main
sys.exit(main())
"""


def tensors(obj, prefix: str = "") -> dict:
    """Every tensor in a checkpoint file, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in tensors(val, f"{prefix}{key}.").items()}


def differences(run: str, ref: str) -> list[str]:
    """What differs between two run dirs' metrics lines (step, loss, val loss) and final checkpoints."""
    key = ("step", "loss", "val_loss")
    a, b = ([[r.get(k) for k in key] for r in runs.rows_of(d)] for d in (run, ref))
    out = [] if a == b else [f"metrics differ from step {next((x[0] for x, y in zip(a, b) if x != y), min(len(a), len(b)))}"]
    last = os.path.join("checkpoints", f"step_{STEPS:08d}")
    names = sorted(n for n in os.listdir(os.path.join(ref, last)) if n.endswith(".pt"))
    for n in names:
        p = os.path.join(run, last, n)
        if not os.path.exists(p):
            out.append(f"{n} missing")
            continue
        x, y = (tensors(torch.load(os.path.join(d, last, n), weights_only=False)) for d in (run, ref))
        bad = [k for k in y if k not in x or not torch.equal(x[k], y[k])] + [k for k in x if k not in y]
        out += [f"{n}: {k} differs" for k in bad[:3]]
    return out


def complete_steps(run_dir: str) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(int(n[5:]) for n in names if re.fullmatch(r"step_\d{8}", n) and os.path.exists(os.path.join(d, n, "COMPLETE")))


def signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def usable_steps(run_dir: str, torn: dict[str, tuple]) -> list[int]:
    """The complete checkpoints whose files the drill has not truncated: ``torn`` maps each file
    it truncated to its signature then. A torn checkpoint stays complete on disk until a launch
    writes its step again (a launch that falls back past it may never reach that step's write:
    a ``stop_after`` checkpoint is off the ``checkpoint_every`` grid), so the next corrupt fault
    must expect the fall-back to go past it too."""
    def intact(step: int) -> bool:
        d = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
        return not any(os.path.dirname(f) == d and signature(f) == sig for f, sig in torn.items())
    return [s for s in complete_steps(run_dir) if intact(s)]


def last_step(run_dir: str, since_ns: int = 0) -> int:
    """The step of the last metrics line, 0 when there is none or the file was not written since
    ``since_ns`` (a launch's start: until its first line, the file still holds the lines a
    previous launch wrote past the checkpoint this one resumes from; thinwire drops them when it
    writes its first, ``MetricsFile``)."""
    try:
        if since_ns and os.stat(os.path.join(run_dir, "metrics.jsonl")).st_mtime_ns < since_ns:
            return 0
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as fh:
            lines = fh.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def launch(ov: list[str], run_dir: str, ctrl_c_at, log, restarts_first: int = 0) -> tuple[int, str, bool, float]:
    """One launch of the run: (exit code, its output, whether SIGINT was sent, seconds). SIGINT
    goes once the metrics lines written since its output said "resumed from" ``restarts_first``
    times (0: since its start) reach ``ctrl_c_at``: a Ctrl-C drawn after a kill, stop or failed
    write lands after the restart (under local updates rank 0 logs steps past a stopped peer's
    until the next synchronisation times out: a Ctrl-C there interrupted the restart instead),
    and never on the lines a previous launch wrote past the checkpoint this one resumes from
    (run 9 of the second seed-0 drill: SIGINT while Python was still starting, exit 1)."""
    armed = time.time_ns() if not restarts_first else None  # when the metrics lines start to count
    cmd = [sys.executable, "-c", LAUNCHER, *ov, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        sent = False
        try:
            while p.poll() is None:
                if ctrl_c_at is not None and armed is None and len(resumed_at(read(log))) >= restarts_first:
                    armed = time.time_ns()  # the restart resumed: its lines count from its first on
                if ctrl_c_at is not None and not sent and armed and last_step(run_dir, armed) >= ctrl_c_at:
                    p.send_signal(signal.SIGINT)  # the launcher only, as `kill -INT <pid>` does
                    sent = True
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    with open(log) as fh:
        return p.returncode, fh.read(), sent, time.perf_counter() - t0


def read(path: str) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()


def skipped_nan(run_dir: str, step: int, out: str) -> bool:
    """Whether step ``step`` was skipped: rank 0's count in its metrics line (every rank's under
    ddp, where ranks agree), or the line a rank prints when it skips a step alone (local, co2)."""
    row = next((r for r in runs.rows_of(run_dir) if r["step"] == step), {})
    return row.get("skipped_steps", 0) >= 1 or f"step {step} skipped" in out


def resumed_at(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", out)]


class Drill:
    def __init__(self, a):
        self.a, self.rng = a, random.Random(a.seed)
        self.queue = deque(self.rng.choice(a.kinds) for _ in range(a.faults))
        self.faults: list[dict] = []   # one per injected fault
        self.runs: list[dict] = []

    def take(self, fits) -> str | None:
        """The first of the next ``LOOK`` drawn faults that ``fits`` here, taken from the queue
        (the seeded order, but a kind that has no place in this launch waits for the next)."""
        for i, k in enumerate(list(self.queue)[:LOOK]):
            if fits(k):
                del self.queue[i]
                return k
        return None

    # -- one run --------------------------------------------------------------------
    def reference(self, ov: list[str]) -> str:
        d = runs.run_dir(self.a.runs_dir, ov, kind="chaos-ref")
        runs.wait_for(d)
        if runs.done(d, STEPS) is None:
            runs.train([*ov, "trainer.overwrite=true"], d)
        return d

    def run(self, n: int, family: str, root: str) -> None:
        rng, rank = self.rng, self.rng.randrange(2)
        base = [*FAMILIES[family], *common(self.a.timeout_s), f"trainer.faults.rank={rank}"]
        run_dir = os.path.join(root, f"run{n:03d}-{family}")
        t0 = time.perf_counter()
        nan, first, done, mine, launches, outs = None, True, False, [], 0, []
        torn: dict[str, tuple] = {}  # the files this run's corrupt faults truncated
        while not done:
            corrupt = None
            ckpts = usable_steps(run_dir, torn)
            if not first and len(ckpts) >= 2 and self.take(lambda k: k == "corrupt"):
                victim = rng.choice(["common.pt", f"rank{rng.randrange(2):05d}.pt"])
                path = os.path.join(run_dir, "checkpoints", f"step_{ckpts[-1]:08d}", victim)
                with open(path, "r+b") as fh:
                    fh.truncate(rng.randrange(1, 200))  # a torn write: no zip directory at its end
                torn[path] = signature(path)
                corrupt = {"kind": "corrupt", "step": ckpts[-1], "file": victim, "expect": ckpts[-2]}
                ckpts = ckpts[:-1]
            start = ckpts[-1] if ckpts and not first else 0
            pos, flt, ctrl_c, stop_after, placed = start, {}, None, None, [corrupt] if corrupt else []
            if nan is None and pos + 3 < STEPS - 2 and self.take(lambda k: k == "nan"):
                nan = pos + rng.randint(1, 3)
                pos = nan
                placed.append({"kind": "nan", "step": nan})
            kind = self.take(lambda k: k in TERMINAL)
            if kind:
                lo = max(pos, EVERY)  # past the first checkpoint: the restart must resume from one
                step = (lo // EVERY + 1) * EVERY if kind == "ckpt_fail" else lo + rng.randint(1, 4)
                if step > STEPS - 3:
                    self.queue.appendleft(kind)  # no room left in this run: the next one takes it
                else:
                    flt[f"trainer.faults.{TERMINAL[kind]}"] = step
                    pos = step
                    placed.append({"kind": kind, "step": step})
            room = pos <= STEPS - 8 and bool(self.queue)
            if room and self.take(lambda k: k == "ctrl_c"):
                ctrl_c = pos + rng.randint(1, 3)
                placed.append({"kind": "ctrl_c", "step": ctrl_c})
            elif room and (placed or nan is None or any(k != "nan" for k in list(self.queue)[:LOOK])):
                stop_after = pos + rng.randint(2, 5)
            ov = [*base, *(["trainer.resume=auto"] if not first else []),
                  *(["trainer.faults.nan_in_restarts=true", f"trainer.faults.nan_at={nan}"] if nan else []),
                  *(f"{k}={v}" for k, v in flt.items()), *([f"trainer.stop_after={stop_after}"] if stop_after else [])]
            log = os.path.join(root, f"run{n:03d}-launch{launches}.log")
            code, out, sent, secs = launch(ov, run_dir, ctrl_c, log, (1 if first else 2) if flt else 0)
            launches += 1
            outs.append(out)
            resumes = resumed_at(out)
            end = last_step(run_dir)
            for f in placed:
                f.update(family=family, run=n, launch=launches, seconds=secs, redone=0)
                k = f["kind"]
                if k == "ctrl_c":
                    f["injected"] = sent
                    f["survived"] = sent and code == 130 and "stopped at step" in out
                elif k == "corrupt":
                    f["injected"] = True
                    f["survived"] = code in (0, 130) and "is unusable" in out and resumes[:1] == [f["expect"]]
                    f["redone"] = f["step"] - f["expect"]
                elif k == "nan":
                    f["injected"] = True  # checked once the run has ended (skipped_nan)
                    f["survived"] = code in (0, 130)
                else:
                    f["injected"] = "resumed from" in out and len(resumes) >= (1 if first else 2)
                    back = resumes[-1] if f["injected"] else None
                    f["survived"] = f["injected"] and code in (0, 130) and back <= f["step"]
                    f["redone"] = f["step"] - back if f["injected"] else 0
                if not f["injected"]:
                    self.queue.appendleft(k)  # not injected (a Ctrl-C that came too late): drawn again
                else:
                    mine.append(f)
            if code not in (0, 130) or (code == 130 and ctrl_c is None):
                print(f"  run {n} ({family}) launch {launches}: exit {code}; see {log}", flush=True)
                break
            first = False
            done = end >= STEPS and code == 0
        ref = self.reference([*FAMILIES[family], *common(self.a.timeout_s),
                              *([f"trainer.faults.rank={rank}", f"trainer.faults.nan_at={nan}"] if nan else [])])
        diff = differences(run_dir, ref) if done else ["the run did not finish"]
        for f in mine:
            f["equal"] = not diff
            if f["kind"] == "nan":
                f["survived"] = f["survived"] and skipped_nan(run_dir, f["step"], "\n".join(outs))
        self.faults += mine
        self.runs.append({"run": n, "family": family, "rank": rank, "launches": launches, "finished": done,
                          "faults": [f["kind"] for f in mine], "differences": diff,
                          "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  run {n} {family}: {launches} launches, faults {[f['kind'] for f in mine]}, "
              f"{'equal to the reference' if not diff else 'DIFFERS: ' + '; '.join(diff[:3])} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not self.a.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    def go(self, root: str) -> None:
        n, t0 = 0, time.perf_counter()
        families = self.a.families
        while self.queue:
            if self.a.max_minutes and time.perf_counter() - t0 > 60 * self.a.max_minutes:
                print(f"chaos: --max-minutes={self.a.max_minutes:g} reached: {len(self.queue)} drawn faults "
                      f"not injected", flush=True)
                break
            self.run(n, families[n % len(families)], root)
            n += 1


def table(faults: list[dict]) -> list[dict]:
    rows = []
    for k in KINDS:
        fs = [f for f in faults if f["kind"] == k]
        if fs:
            rows.append({"kind": k, "injected": len(fs), "survived": sum(f["survived"] for f in fs),
                         "end_state_equal": sum(f["equal"] for f in fs), "steps_redone": sum(f["redone"] for f in fs),
                         "launch_seconds": round(sum(f["seconds"] for f in fs), 1)})
    return rows


def markdown(doc: dict) -> str:
    lines = ["| fault | injected | survived | end state equal to the reference | steps redone | seconds of the launches holding it |",
             "|---|---|---|---|---|---|"]
    for r in doc["table"]:
        lines.append(f"| {r['kind']} | {r['injected']} | {r['survived']} | {r['end_state_equal']} | "
                     f"{r['steps_redone']} | {r['launch_seconds']} |")
    t = doc["totals"]
    lines.append(f"| **all** | {t['injected']} | {t['survived']} | {t['end_state_equal']} | {t['steps_redone']} | |")
    left = f"; {doc['not_injected']} drawn faults not injected (--max-minutes)" if doc["not_injected"] else ""
    return "\n".join(lines) + (f"\n\n{doc['faults_asked']} faults drawn (seed {doc['seed']}){left}; {t['runs']} runs ({t['runs_equal']} equal to their reference), "
                               f"{t['launches']} launches, {t['seconds']:.0f} s in all; {doc['load']}.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=100, help="faults to draw (the last run finishes: a lower bound)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="the kinds to draw from, comma-separated")
    ap.add_argument("--families", default=",".join(FAMILIES), help="the configs the runs cycle through")
    ap.add_argument("--timeout-s", type=float, default=20.0, help="dist.timeout_s: how long a stopped rank is waited for")
    ap.add_argument("--runs-dir", default=os.path.join(RESULTS, "chaos", "runs"), help="where the fault-free references are cached")
    ap.add_argument("--out", default=os.path.join(RESULTS, "chaos"), help="results: <out>.json and <out>.md")
    ap.add_argument("--max-minutes", type=float, default=0, help="start no run after this long (0: no limit)")
    ap.add_argument("--keep", action="store_true", help="keep the drill's run dirs and launch logs")
    ap.add_argument("--elastic", action="store_true", help="the elastic cases (bench/chaos_elastic.py) instead")
    a = ap.parse_args(argv)
    if a.elastic:
        return elastic_drill(a, argv)
    a.kinds, a.families = a.kinds.split(","), a.families.split(",")
    for key, vals, known in (("--kinds", a.kinds, KINDS), ("--families", a.families, FAMILIES)):
        bad = [v for v in vals if v not in known]
        if bad:
            print(f"chaos.py: {key}={','.join(vals)}: {bad[0]} is not one of {', '.join(known)}", file=sys.stderr)
            return 2
    if a.faults < 1:
        print(f"chaos.py: --faults={a.faults}: must be >= 1", file=sys.stderr)
        return 2
    load0 = manifest.machine_load()
    root = tempfile.mkdtemp(prefix="twchaos")
    t0 = time.perf_counter()
    drill = Drill(a)
    print(f"chaos: {a.faults} faults (seed {a.seed}) into {root}; {load0}", flush=True)
    drill.go(root)
    fs, rs = drill.faults, drill.runs
    totals = {"injected": len(fs), "survived": sum(f["survived"] for f in fs),
              "end_state_equal": sum(f["equal"] for f in fs), "steps_redone": sum(f["redone"] for f in fs),
              "runs": len(rs), "runs_equal": sum(not r["differences"] for r in rs),
              "launches": sum(r["launches"] for r in rs), "seconds": time.perf_counter() - t0}
    doc = {"seed": a.seed, "faults_asked": a.faults, "not_injected": len(drill.queue), "steps": STEPS, "checkpoint_every": EVERY,
           "timeout_s": a.timeout_s, "load": f"{load0} at the start, {manifest.machine_load()} at the end",
           "table": table(fs), "totals": totals, "runs": rs, "faults": fs}
    text = markdown(doc)
    print(text)
    record(a, argv, a.out, doc, text, root)
    ok = totals["injected"] == totals["survived"] == totals["end_state_equal"] and totals["runs"] == totals["runs_equal"]
    return 0 if ok else 1


def record(a, argv, out: str, doc: dict, text: str, root: str) -> None:
    """``<out>.json`` and ``<out>.md`` with their manifest entries; the run dirs removed unless ``--keep``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    manifest.write(out + ".json", doc, "bench/chaos.py", argv)
    manifest.write(out + ".md", text, "bench/chaos.py", argv)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"chaos: run dirs and logs kept in {root}")


def elastic_drill(a, argv) -> int:
    import chaos_elastic

    load0, t0 = manifest.machine_load(), time.perf_counter()
    root = tempfile.mkdtemp(prefix="twchaos-elastic")
    print(f"chaos: elastic cases into {root}; {load0}", flush=True)
    results = chaos_elastic.drill(root)
    load = f"{load0} at the start, {manifest.machine_load()} at the end"
    text = chaos_elastic.markdown(results, load, time.perf_counter() - t0)
    print(text)
    doc = {"cases": results, "load": load, "seconds": round(time.perf_counter() - t0, 1)}
    record(a, argv, a.out + "_elastic", doc, text, root)
    return 0 if all(r["survived"] and r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
