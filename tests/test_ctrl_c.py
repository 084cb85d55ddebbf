"""Ctrl-C in a multi-rank run started by ``thinwire-train ... dist.nproc=2``: SIGINT to the
self-launcher (which passes it on to its workers, as a terminal's Ctrl-C also does) stops
every rank after the same step (under ``sync=local``: at the next synchronisation) with a
checkpoint of it on every rank; ``trainer.resume=auto``
then continues to the same floats as an uninterrupted run (per-step losses and parameters,
bitwise on CPU; dropout on, so the RNG streams must come back too)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

BASE = ["experiment=tiny", "dist.nproc=2", "trainer.max_steps=100000", "trainer.checkpoint_every=100000",
        "trainer.eval_every=100000", "model.dropout=0.1", "logger=none"]
MORE = 3  # steps the resumed run and the reference take past the interrupted step


def steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


def losses(run_dir) -> list:
    with open(run_dir / "metrics.jsonl") as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh)]


EXT = pytest.mark.extended  # a launcher each, ~7 s: ddp's case stays in the default tier


@pytest.mark.parametrize("sync, period", [
    ([], 1),
    pytest.param(["sync=local", "sync.local_steps=4"], 4, marks=EXT),
    pytest.param(["sync=co2", "sync.local_steps=4"], 4, marks=EXT),                       # a mean in flight at the stop
    pytest.param(["sync=local", "sync.local_steps=4", "sync.fragments=2"], 2, marks=EXT),  # streaming: a fragment every 2 steps
], ids=["ddp", "local-H4", "co2-H4", "streaming-F2"])
def test_ctrl_c_on_the_launcher_checkpoints_every_rank_and_resumes_bitwise(pools, tmp_path, sync, period):
    """Under local updates the ranks do not talk between synchronisations: the request rides
    on the next one's finiteness all-reduce, so the run stops at a synchronisation step."""
    run, full = tmp_path / "run", tmp_path / "full"
    args = [*BASE, *sync]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thinwire.train", *args, f"hydra.run.dir={run}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while steps_logged(run) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # the launcher only, as `kill -INT <pid>` would
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    found = re.search(r"thinwire: stopped at step (\d+) \(Ctrl-C\); checkpoint (\S+); continue with: (.*)", out)
    assert found, (out, err)
    stop = int(found[1])
    assert ("stopping at the next synchronisation" in out) == bool(sync), out
    assert stop % period == 0, stop
    assert "trainer.resume=auto" in found[3] and "Traceback" not in err, err
    ckpt = run / "checkpoints" / f"step_{stop:08d}"
    assert found[2] == str(ckpt)
    assert sorted(os.listdir(ckpt)) == ["COMPLETE", "common.pt", "rank00000.pt", "rank00001.pt"]
    assert [s for s, _ in losses(run)] == list(range(1, stop + 1))  # every completed step, none after

    end = [f"trainer.stop_after={stop + MORE}"]
    # the continuation and the uninterrupted reference both train on the test's ranks (the
    # same train() as the CLI's workers; a failure on any rank fails the test): what the CLI
    # adds here, the launcher's Ctrl-C path, is the interrupted run above
    resumed = pools.train(*args, *end, f"hydra.run.dir={run}", "trainer.resume=auto")
    assert f"resumed from {ckpt} at step {stop}" in resumed.stdout, (resumed.stdout, resumed.stderr)
    pools.train(*args, *end, f"hydra.run.dir={full}")  # the uninterrupted reference

    assert losses(run) == losses(full)
    last = f"step_{stop + MORE:08d}"
    files = ["common.pt", "rank00000.pt", "rank00001.pt"]
    a, b = ({f: tensors(torch.load(d / "checkpoints" / last / f, weights_only=False)) for f in files}
            for d in (run, full))
    assert any(k.startswith("model.") for f in files for k in a[f])  # the parameters (per rank under local)
    for f in files:
        assert a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f


def tensors(obj, prefix: str = "") -> dict:
    """Every tensor in a checkpoint file, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in tensors(val, f"{prefix}{key}.").items()}
