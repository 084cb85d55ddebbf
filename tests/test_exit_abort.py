"""A user's script (DDP + thinwire's Top-K/EF comm hook, ``dist.destroy_process_group()``, a
normal return, no other thinwire call) exits 0 on both ranks even when a gloo thread is slow
to free what a callback returned (issue 36). ``THINWIRE_TEST_RELEASE_DELAY_S`` makes such a
thread sleep 1 s, the GIL released, while it frees each tensor a thinwire callback returned:
without thinwire.comm.futures's holding and exit handler, the main thread finalises the
interpreter meanwhile and both ranks abort ("terminate called without an active exception",
SIGABRT) every time. Real processes, a real exit: no ``os._exit`` here."""
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


@pytest.mark.slow
def test_a_users_ddp_script_exits_0_when_gloo_frees_late():
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "THINWIRE_TEST_RELEASE_DELAY_S": "1", "WANDB_MODE": "disabled",
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "exit_abort_user.py"), "3"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and "terminate called" not in out, f"rank {rank}: exit {p.returncode}\n{out[-2000:]}"
