"""Shared helpers: run a function on p gloo ranks (long-lived ranks from tests/pool.py, or
fresh spawned ones), train on long-lived ranks (``pools``), run the CLI; and the two tiers.

Tiers. ``bash launch/test.sh`` (the README's test command) runs the **default tier**;
``bash launch/test.sh --extended`` runs the default and the **extended tier** (``.ci/run``
runs both, one after the other: ``-m extended`` selects the extended tier alone). The rule
for where a test goes:

- default: unit and config tests; for each mechanism one representative multi-process test
  (on the pooled ranks of tests/pool.py wherever it does not need a process of its own); the
  README's quickstart and plugin commands. Budget: the whole default tier within 10 minutes
  of a fresh clone on an idle 2-core machine, setup (~95 s) included, with room for a
  machine 40% slower: pytest itself <= ~270 s there (``--durations=0`` says what each
  test costs).
- extended (``@pytest.mark.extended``): long quality and convergence checks (hundreds of
  training steps), slow end-to-end CLI launches beyond the one per mechanism kept in the
  default tier, full matrices whose representative is already in the default tier, and the
  commands of docs/ (tests/test_docs.py). Budget: ``.ci/run`` (both tiers) <= 45 minutes.

A test that costs more than ~5 s and checks what a default-tier test already checks goes to
the extended tier; a new issue states the seconds it adds to each tier. Moving a test
between tiers never deletes it. ``-m`` expressions that name neither tier (``-m "not slow"``,
``-m gpu``) keep the extended tier out unless ``--extended`` is given.
"""
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


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the extended tier (tests marked extended; see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    """Leave the extended tier out unless ``--extended`` is given or ``-m`` names it."""
    if config.getoption("--extended") or "extended" in (config.getoption("markexpr") or ""):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("extended") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def pools():
    """``pools.train(*overrides)``: a training run on the session's long-lived ranks."""
    yield POOLS
    POOLS.close()
