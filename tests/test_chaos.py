"""The chaos drill's short version (bench/chaos.py): four faults in sequence in one run of
ddp + Top-K with error feedback at 2 ranks, each end state bitwise equal to the fault-free
reference. Seed 12 draws NaN gradients, a failed checkpoint write (restart from the one
before), Ctrl-C on the launcher and a corrupt newest checkpoint before the resume."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.extended  # three attempts and a reference: ~40 s on 2 idle cores


def test_short_drill_survives_every_fault_with_the_reference_end_state(tmp_path):
    out = tmp_path / "chaos"
    p = subprocess.run([sys.executable, os.path.join("bench", "chaos.py"), "--faults", "4", "--seed", "12",
                        "--families", "ddp+topk-ef", "--timeout-s", "10", "--runs-dir", str(tmp_path / "refs"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900)
    doc = json.loads((tmp_path / "chaos.json").read_text()) if (tmp_path / "chaos.json").exists() else None
    assert p.returncode == 0 and doc, p.stdout[-3000:] + p.stderr[-3000:]
    kinds = sorted(f["kind"] for f in doc["faults"])
    assert kinds == ["ckpt_fail", "corrupt", "ctrl_c", "nan"], doc["faults"]
    assert all(f["injected"] and f["survived"] and f["equal"] for f in doc["faults"]), doc["faults"]
    assert [r["differences"] for r in doc["runs"]] == [[]]
    # a failed write and a corrupt checkpoint each redo the steps since the checkpoint before
    assert all(f["redone"] > 0 for f in doc["faults"] if f["kind"] in ("ckpt_fail", "corrupt")), doc["faults"]
