"""thinwire.comm.futures: callbacks on collective futures are counted until released, the
futures and works are held from Python, and the exit handler waits for them (a gloo thread that
releases one during interpreter finalisation aborts the process: see the module doc). The abort
itself is made certain by tests/test_exit_abort.py (a real 2-rank exit); these tests keep the
mechanism and its use in place."""
from __future__ import annotations

import os
import re
import threading
import time
import weakref

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
    never = torch.futures.Future()
    futures.then(never, lambda f: None)
    t0 = time.monotonic()
    futures.drain(timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    never.set_result(None)  # this process's own exit must not wait for it


def test_futures_are_held_until_done_then_released_after_hold_s():
    fut = torch.futures.Future()
    out = futures.then(fut, lambda f: f.value())
    ident = {id(fut), id(out)}
    held = lambda: {id(e[0]) for e in futures._held} & ident  # noqa: E731
    futures.hold()
    assert held() == ident  # not done: held
    fut.set_result(torch.ones(2))
    futures.hold()
    assert held() == ident  # done, but not seen done HOLD_S ago
    time.sleep(futures.HOLD_S + 0.05)
    futures.hold()  # a pass: seen done now
    assert held() == ident
    time.sleep(futures.HOLD_S + 0.05)
    futures.hold()  # a pass: seen done HOLD_S ago, released
    assert not held()


def test_a_callbacks_function_is_released_by_a_later_pass_not_by_the_thread_that_ran_it():
    """What a callback's closure owns (the averager's process group, in docs/examples/library/
    local_sgd.py) must not be freed by the collective's thread that ran it: a gloo group freed
    on its own worker thread aborts ("Resource deadlock avoided", tests/test_exit_abort.py)."""
    class Owner:  # stands for the process group a closure owns
        pass
    owner = Owner()
    alive = weakref.ref(owner)
    fut = torch.futures.Future()
    futures.then(fut, lambda f, o=owner: None)
    del owner
    thread = threading.Thread(target=fut.set_result, args=(1,))
    thread.start()
    thread.join()
    assert alive() is not None  # run and dropped by that thread: still held
    time.sleep(futures.HOLD_S + 0.05)
    futures.hold()  # a pass on this thread, HOLD_S after the callback ran: released here
    assert alive() is None


def test_thinwire_attaches_no_uncounted_callback():
    pattern = re.compile(r"\.then\(|\.add_done_callback\(")
    for root, _, files in os.walk(os.path.join(REPO, "thinwire")):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != futures.__file__:
                with open(path) as fh:
                    assert not pattern.search(fh.read()), f"{path}: use thinwire.comm.futures.then / on_done"
