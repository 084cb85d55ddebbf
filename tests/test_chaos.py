"""The chaos drill's short version (bench/chaos.py): four faults in sequence in one run of
ddp + Top-K with error feedback at 2 ranks, each end state bitwise equal to the fault-free
reference. Seed 12 draws NaN gradients, a failed checkpoint write (restart from the one
before), Ctrl-C on the launcher and a corrupt newest checkpoint before the resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

# three attempts and a reference: 478 s at load average 100-130 on the shared 2 cores, 45 s of CPU
# time (user + sys, `/usr/bin/time` around pytest), so about 25-45 s on 2 idle cores (not measured)
pytestmark = pytest.mark.extended


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


def test_a_checkpoint_the_drill_tore_earlier_is_not_the_fall_back_it_expects(tmp_path):
    """Run 16 of the measured drill (seed 0, DiLoCo): a launch had fallen back past step 13 (its
    common.pt torn by the drill) and never wrote step 13 again (a stop_after step); the next
    corrupt fault tore step 16 and expected the resume from 13, where thinwire rightly went on to
    12. The drill now expects the newest checkpoint it has not torn, until a launch rewrites it."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import chaos

    ckpts = tmp_path / "checkpoints"

    def write(step: int) -> None:
        d = ckpts / f"step_{step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for name in ("COMPLETE", "common.pt", "rank00000.pt", "rank00001.pt"):
            (d / name).write_bytes(b"x" * 1000)

    for step in (12, 13, 16):
        write(step)
    torn = {}
    for step, name in ((13, "common.pt"), (16, "rank00001.pt")):
        path = str(ckpts / f"step_{step:08d}" / name)
        os.truncate(path, 100)
        torn[path] = chaos.signature(path)
    assert chaos.complete_steps(str(tmp_path)) == [12, 13, 16]
    assert chaos.usable_steps(str(tmp_path), torn) == [12]
    shutil.rmtree(ckpts / "step_00000013")
    write(13)  # a later launch writes step 13 again
    assert chaos.usable_steps(str(tmp_path), torn) == [12, 13]


def test_ckpt_fail_at_fails_that_rank_s_write_in_the_first_attempt_only(tmp_path, monkeypatch):
    """The injected full disk goes through the atomic writer's own failure path: no file left
    behind, one line naming the file and the free space; restarts write cleanly."""
    import torch

    from thinwire.trainer import checkpoint
    from thinwire.trainer.faults import FaultConfig, FaultInjector

    cfg = FaultConfig(rank=1, ckpt_fail_at=8, nan_at=3)
    inj = FaultInjector(cfg, rank=1)
    assert inj.checkpoint_write_error(4) is None and FaultInjector(cfg, rank=0).checkpoint_write_error(8) is None
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        checkpoint._atomic_save({"x": torch.ones(2)}, str(tmp_path / "rank00001.pt"), inj.checkpoint_write_error(8))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device (injected: trainer.faults.ckpt_fail_at=8)" in msg
    assert "MiB free there" in msg and os.listdir(tmp_path) == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restart: clean, but a recurring NaN recurs
    assert FaultInjector(cfg, rank=1).checkpoint_write_error(8) is None and not FaultInjector(cfg, rank=1).nan_active
    assert FaultInjector(FaultConfig(rank=1, nan_at=3, nan_in_restarts=True), rank=1).nan_active
