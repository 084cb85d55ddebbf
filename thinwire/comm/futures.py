"""Python callbacks on collective futures, drained before the interpreter finalises.

A Python callback given to ``Future.then`` runs on the thread that completes the future (a
gloo worker thread for a CPU collective), and that thread also destroys the callback
afterwards, which takes the GIL. When a user's loop ends right after its last step, the main
thread can reach interpreter finalisation while a gloo thread is still destroying the last
step's callbacks (DDP's backward returns as soon as the hook's future is marked complete, a
few frames before the callbacks of the chain are released). CPython then ends the thread that
asks for the GIL with ``pthread_exit``, whose forced unwinding through C++ frames calls
``std::terminate``: "terminate called without an active exception", SIGABRT, in about one
run in ten of a short 2-rank loop (core dump: ``ProcessGroupGloo::runLoop`` ->
``Future::markCompleted`` -> ``PythonFunctionGuard`` disposal -> ``take_gil`` ->
``PyThread_exit_thread``). Every thinwire callback goes through :func:`then`, which counts the
callbacks not yet released; an ``atexit`` handler (run before CPython starts finalising)
waits for that count to reach 0, for at most ``DRAIN_S`` seconds (a future that never
completes must not hold the exit).
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import weakref

DRAIN_S = 2.0
_live: set[int] = set()   # ids of callbacks not yet released (set.add / discard: atomic under the GIL)


class _Callback:
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn
        _live.add(id(self))

    def __call__(self, fut):
        out = self.fn(fut)
        if _TEST_DELAY_S:
            _delay_release(out)
        return out

    def __del__(self):
        _live.discard(id(self))


def then(fut, fn):
    """``fut.then(fn)``, with ``fn`` counted until the thread that ran it has released it."""
    return fut.then(_Callback(fn))


# test only (tests/test_exit_abort.py): a tensor a callback returned sleeps this long (the GIL
# released) when a thread other than the main one frees it, which makes the exit race certain
_TEST_DELAY_S = float(os.environ.get("THINWIRE_TEST_RELEASE_DELAY_S", "0") or 0)
_MAIN_IDENT = threading.main_thread().ident


def _slow_release() -> None:
    if threading.get_ident() != _MAIN_IDENT:
        time.sleep(_TEST_DELAY_S)


def _delay_release(out) -> None:
    import torch
    for t in (out if isinstance(out, (list, tuple)) else [out]):
        if isinstance(t, torch.Tensor):
            weakref.finalize(t, _slow_release)


def live_callbacks() -> int:
    return len(_live)


@atexit.register
def drain(timeout_s: float = DRAIN_S) -> None:
    """Wait (the GIL released) until every callback has been released, or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _live and time.monotonic() < deadline:
        time.sleep(0.001)
