"""thinwire.comm.futures: callbacks on collective futures are counted until released, and the
exit handler waits for them (a gloo thread that releases one during interpreter finalisation
aborts the process: see the module doc). The abort itself needs ~50 real process exits to show
(10% of runs before, 0 of 75 after); these tests keep the mechanism and its use in place."""
from __future__ import annotations

import os
import re
import threading
import time

import torch

from thinwire.comm import futures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_callback_completed_on_another_thread_is_drained():
    fut = torch.futures.Future()
    before = futures.live_callbacks()
    out = futures.then(fut, lambda f: f.value() + 1)
    assert futures.live_callbacks() == before + 1
    threading.Thread(target=lambda: (time.sleep(0.05), fut.set_result(41))).start()
    futures.drain(timeout_s=5.0)
    assert out.wait() == 42 and futures.live_callbacks() == before


def test_drain_gives_up_on_a_future_that_never_completes():
    futures.then(torch.futures.Future(), lambda f: None)
    t0 = time.monotonic()
    futures.drain(timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0


def test_thinwire_attaches_no_uncounted_callback():
    pattern = re.compile(r"\.then\(")
    for root, _, files in os.walk(os.path.join(REPO, "thinwire")):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != futures.__file__:
                with open(path) as fh:
                    assert not pattern.search(fh.read()), f"{path}: use thinwire.comm.futures.then"
