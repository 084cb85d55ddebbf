"""A user's script (DDP + thinwire's Top-K/EF comm hook, ``dist.destroy_process_group()``, a
normal return, no other thinwire call) exits 0 on both ranks even when a gloo thread is slow
to free what a callback returned (issue 36). ``THINWIRE_TEST_RELEASE_DELAY_S`` makes such a
thread sleep 1 s, the GIL released, while it frees each tensor a thinwire callback returned:
without thinwire.comm.futures's holding and exit handler, the main thread finalises the
interpreter meanwhile and both ranks abort ("terminate called without an active exception",
SIGABRT) every time. The second race (a callback's closure owning the last reference to a
process group, freed on that group's own gloo thread: "Resource deadlock avoided") is made
certain with ``THINWIRE_TEST_CALLBACK_RELEASE_DELAY_S`` on docs/examples/library/local_sgd.py.
Real processes, a real exit: no ``os._exit`` here."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: list[str], **env_extra: str) -> None:
    """``script`` at 2 ranks as torchrun starts them (real processes, a real exit); asserts that
    both exit 0 without "terminate called"."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "disabled", **env_extra,
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, *script], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and "terminate called" not in out, f"rank {rank}: exit {p.returncode}\n{out[-2000:]}"


@pytest.mark.slow
def test_a_users_ddp_script_exits_0_when_gloo_frees_late():
    run_two_ranks([os.path.join(REPO, "tools", "exit_abort_user.py"), "3"], THINWIRE_TEST_RELEASE_DELAY_S="1")


@pytest.mark.extended
def test_local_sgd_example_exits_0_when_gloo_releases_a_callback_after_destroy():
    """docs/examples/library/local_sgd.py (OuterLoop, sync=co2, Top-K/EF), then
    ``dist.destroy_process_group()`` and a normal return. ``THINWIRE_TEST_CALLBACK_RELEASE_DELAY_S``
    makes a gloo thread that releases a thinwire callback wait until the main thread has destroyed
    the default group (the race made certain): before the fix, the aggregator's ``finish`` closure
    then owned the last reference to the OuterLoop's process group, which that group's own worker
    thread destroyed: "terminate called after throwing an instance of 'std::system_error' what():
    Resource deadlock avoided" (SIGABRT) on at least one rank every time."""
    run_two_ranks([os.path.join(REPO, "tools", "exit_abort_example.py"), "local_sgd"],
                  THINWIRE_TEST_CALLBACK_RELEASE_DELAY_S="10")
