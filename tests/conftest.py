"""Shared helpers: run a function on p gloo ranks (long-lived ranks from tests/pool.py, or
fresh spawned ones), train on long-lived ranks (``pools``), run the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
import uuid

import pytest
import torch.multiprocessing as mp

from pool import POOLS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(rank: int, fn, world_size: int, init_file: str, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank leaves while a peer still talks to it
    except BaseException:
        traceback.print_exc()
        leave(1)
    leave(0)


def leave(code: int) -> None:
    """Exit without destroying the process group and without the interpreter's teardown.

    In ~1 of 12 runs of a loop with a Python comm hook on gloo, tearing gloo down aborts the
    process: "terminate called without an active exception" when the static destructors run,
    or "std::system_error: Resource deadlock avoided" inside ``destroy_process_group`` (a gloo
    thread joined from itself), SIGABRT with no Python frame. The result is saved and every
    rank has passed the barrier, so nothing is lost by leaving at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(fn, world_size: int, tmp_path, *args) -> list:
    """Run ``fn(rank, world_size, *args)`` on the session's ``world_size`` long-lived gloo
    ranks (tests/pool.py); return their results. ``fn`` must leave the default group usable
    and the process as it found it (seeds are set by whoever relies on them)."""
    return POOLS.call(fn, world_size, tmp_path, *args)


def run_fresh_ranks(fn, world_size: int, tmp_path, *args) -> list:
    """``run_ranks`` on newly spawned ranks: for ``fn`` that needs a process of its own
    (entry points are read once per process)."""
    import torch

    # a fresh rendezvous file per call: ranks leave with os._exit, so FileStore never deletes
    # its file, and a second group in the same tmp_path must not read the first one's keys
    init_file = str(tmp_path / f"init-{world_size}-{uuid.uuid4().hex[:8]}")
    if os.path.exists(init_file):  # an earlier call's: its ranks left with os._exit, so no FileStore removed it,
        os.remove(init_file)       # and its stale addresses would hang or refuse this call's gloo connect
    mp.start_processes(_entry, args=(fn, world_size, init_file, str(tmp_path), args), nprocs=world_size,
                       join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_cli(*overrides: str, env: dict | None = None, timeout: int = 180, launcher: list | None = None,
            cwd: str | None = None):
    """Run ``thinwire-train`` (or ``launcher`` + the module) in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "thinwire.train"]) + list(overrides)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO)


def cli_error(capsys, *argv):
    """Run the CLI's entry function in this process (no interpreter or torch start); its exit
    status and its stderr, which must be one line without a traceback."""
    from thinwire.train import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return exc.value.code, err


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def pools():
    """``pools.train(*overrides)``: a training run on the session's long-lived ranks."""
    yield POOLS
    POOLS.close()
