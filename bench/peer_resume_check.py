"""Does a torch peer row of bench/time_to_target.py resume as the protocol needs? Its decay
branch, resumed from the constant run's checkpoint, must end where the run configured with
that decay from the start ends (thinwire's own rows are checked so in tests/test_schedule.py).

    python bench/peer_resume_check.py --row "torch PowerSGD r4" --start-iter 4
    python bench/peer_resume_check.py --row "torch PostLocalSGD H=8"

A short version of the protocol on the harness model at ``--nproc`` ranks (LR warm-up 4): a
constant-LR run to 32 steps checkpointed at 16, the branch 16 -> 24 (decay from 16) resumed
from it, and a 24-step run decaying from 16; prints both runs' losses over steps 17-24 and
val losses and exits 1 unless they are bitwise equal. ``--start-iter`` overrides the row's
warm-up (PowerSGD's ``max(20, S/10)`` would start compressing after the branch point here).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from harness import runs
from harness import time_to_target as t
from harness.catalogue import MODEL, overrides
from harness.runs import rows_of


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", required=True, choices=list(t.PEER_ROWS))
    ap.add_argument("--start-iter", type=int, default=None, help="the peer's warm-up (default: the row's at S = 20)")
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args(argv)
    flags = t.peer_flags(a.row, 20)
    if a.start_iter is not None:
        flags = [f for f in flags if not f.startswith("--start-iter=")] + [f"--start-iter={a.start_iter}"]
    base = [*overrides(a.row), *flags, *MODEL, "optim.lr=0.003", "optim.schedule=wsd", "optim.warmup_steps=4",
            "trainer.seed=0", "trainer.sample_chars=0", "trainer.progress=false", "logger=none",
            f"dist.nproc={a.nproc}", "trainer.log_every=1"]
    root = tempfile.mkdtemp(prefix="twpeercheck")  # no '=' in the path: Hydra's override grammar
    try:
        const, branch, straight = (os.path.join(root, k) for k in ("const", "branch", "straight"))
        runs.launch([*base, "trainer.max_steps=32", "optim.decay_start=32", "trainer.checkpoint_every=16",
                  "trainer.keep_checkpoints=0", "trainer.eval_every=32"], const, {}, "constant to 32")
        runs.launch([*base, "trainer.max_steps=24", "optim.decay_start=16", "trainer.checkpoint_every=24",
                     f"trainer.resume={const}/checkpoints/step_00000016", "trainer.eval_every=24"],
                 branch, {}, "branch 16 -> 24", fresh=False)
        runs.launch([*base, "trainer.max_steps=24", "optim.decay_start=16", "trainer.checkpoint_every=24",
                     "trainer.eval_every=24"], straight, {}, "configured 24")
        b, s = rows_of(branch), rows_of(straight)
        lb, ls = [r["loss"] for r in b if r["step"] > 16], [r["loss"] for r in s if r["step"] > 16]
        print(f"{a.row} ({' '.join(flags)}), {a.nproc} ranks: resumed branch val {b[-1]['val_loss']!r}, "
              f"configured run val {s[-1]['val_loss']!r}; losses 17-24 equal: {lb == ls}")
        same = lb == ls and b[-1]["val_loss"] == s[-1]["val_loss"]
        print("bitwise equal" if same else "DIFFERENT")
        return 0 if same else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
