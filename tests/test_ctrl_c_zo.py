"""Ctrl-C under the zeroth-order optimizers (``optim=mezo``, ``optim=zo_dist``) at 2 ranks
(issue 36 item 3). Their per-step exchange (3 bytes per rank under zo_dist) has no room for a
vote, so the request rides on the periodic replica check's all-gather (the rank's skipped
count plus a flag: no extra byte): every rank stops at the next check with a checkpoint of
it, and ``trainer.resume=auto`` continues bitwise to the floats of an uninterrupted run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from test_ctrl_c import BASE, MORE, losses, steps_logged, tensors

CHECK = 3  # trainer.drift_check_every: where the run may stop


@pytest.mark.slow
@pytest.mark.extended  # ~11 s each; the launcher's Ctrl-C is in the default tier (tests/test_ctrl_c.py)
@pytest.mark.parametrize("optim", [["optim=mezo"], ["optim=zo_dist"]], ids=["mezo", "zo_dist"])
def test_ctrl_c_under_zeroth_order_stops_at_a_replica_check_and_resumes_bitwise(pools, tmp_path, optim):
    run, full = tmp_path / "run", tmp_path / "full"
    args = [*BASE, *optim, f"trainer.drift_check_every={CHECK}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thinwire.train", *args, f"hydra.run.dir={run}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while steps_logged(run) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "stopping at the next replica check" in out, out
    found = re.search(r"thinwire: stopped at step (\d+) \(Ctrl-C\); checkpoint (\S+); continue with: (.*)", out)
    assert found, (out, err)
    stop = int(found[1])
    assert stop % CHECK == 0 and "Traceback" not in err, (stop, err)
    ckpt = run / "checkpoints" / f"step_{stop:08d}"
    assert found[2] == str(ckpt)
    assert sorted(os.listdir(ckpt)) == ["COMPLETE", "common.pt", "rank00000.pt", "rank00001.pt"]
    assert [s for s, _ in losses(run)] == list(range(1, stop + 1))

    end = [f"trainer.stop_after={stop + MORE}"]
    resumed = pools.train(*args, *end, f"hydra.run.dir={run}", "trainer.resume=auto")
    assert f"resumed from {ckpt} at step {stop}" in resumed.stdout, (resumed.stdout, resumed.stderr)
    pools.train(*args, *end, f"hydra.run.dir={full}")
    assert losses(run) == losses(full)
    last = f"step_{stop + MORE:08d}"
    files = ["common.pt", "rank00000.pt", "rank00001.pt"]
    a, b = ({f: tensors(torch.load(d / "checkpoints" / last / f, weights_only=False)) for f in files}
            for d in (run, full))
    assert any(k.startswith("model.") for f in files for k in a[f])
    for f in files:
        assert a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f
