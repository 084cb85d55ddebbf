"""Python callbacks on collective futures, and the collectives' own objects, released before
the interpreter finalises.

A Python callback given to ``Future.then`` runs on the thread that completes the future (a
gloo worker thread for a CPU collective). That thread also releases, after the callback, the
Python objects the chain holds: the callback itself (``PythonFunctionGuard`` takes the GIL to
drop it), the value of the child future (a Python object: the tensors the callback returned),
and, when it drops the last reference to a finished ``Work``, the tensors of the collective.
When a user's loop ends right after its last step, the main thread can reach interpreter
finalisation while a gloo thread is still releasing the last step's objects (DDP's backward
returns as soon as the hook's future is marked complete, a few frames before the chain is
released; ``dist.destroy_process_group()`` does not join gloo's threads while DDP still holds
the group). CPython then ends the thread that asks for the GIL with ``pthread_exit``, whose
forced unwinding through C++ frames calls ``std::terminate``: "terminate called without an
active exception", SIGABRT (core dump: ``ProcessGroupGloo::runLoop`` -> ``Future::markCompleted``
-> ``PythonFunctionGuard`` / ``ConcretePyObjectHolder`` disposal -> ``take_gil`` ->
``PyThread_exit_thread``). torch knows the class of bug (pytorch/pytorch#38228: C++ threads
that take the GIL during finalisation abort; the abandoned pytorch/pytorch#179291 would have
destroyed the process groups at exit; ``destroy_process_group`` waits for pending works only
for hooks registered on the group itself) and does not fix it for ``Future.then``.

What thinwire does (no call in the user's script):

- every thinwire callback goes through :func:`then`, which counts the callbacks not yet
  released (``_live``); once run, a callback's function is held as a completed future is
  (:func:`_keep_released`), so the thread that ran it never frees its closure: a closure may own
  the last reference to a process group, and a gloo group freed on one of its own worker threads
  joins that thread ("Resource deadlock avoided", SIGABRT; seen at the exit of
  docs/examples/library/local_sgd.py, whose averager's ``finish`` closure owned the OuterLoop's
  group after ``dist.destroy_process_group()``);
- every asynchronous collective (``accounting``) and every future :func:`then` chains from or
  returns is *held* from Python (:func:`hold`), so a gloo thread never drops the last reference
  to a Python-owning object: a thread that runs no callback does (no release pass runs inside
  one), a while after the future completed (``HOLD_S``), or nothing does (at exit);
- an ``atexit`` handler (run before CPython starts finalising; registered at import, so it runs
  after the handlers that user code registers later) waits until every held future has
  completed and every callback has been released (at most ``DRAIN_S`` for a future that never
  completes: a dead peer must not hold the exit), then keeps what is held alive for good, so
  that finalisation frees nothing a gloo thread may still be dropping.

Tests only (tests/test_exit_abort.py), each making one race certain:
``THINWIRE_TEST_RELEASE_DELAY_S`` makes a gloo thread that frees a tensor a callback returned
sleep that long with the GIL released; ``THINWIRE_TEST_CALLBACK_RELEASE_DELAY_S`` makes a
thread other than the main one that releases a callback wait until the default process group
is destroyed (at most that many seconds).
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import os
import threading
import time
import weakref

DRAIN_S = 2.0     # the longest the exit waits for held futures that have not completed
HOLD_S = 0.25     # a completed future is released this long after it was first seen done
_live: set[int] = set()   # ids of callbacks not yet released (set.add / discard: atomic under the GIL)
_held: collections.deque = collections.deque()   # [obj, seen_done_at or None], oldest first
_lock = threading.Lock()
_last_pass = 0.0  # time.monotonic() of hold()'s last pass
_pass_len = 64    # hold() passes when this many are held
_kept: list = []  # what the exit handler keeps alive for good
_in_callback = threading.local()  # .depth: > 0 while this thread runs a callback (a gloo thread)


class _Callback:
    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn):
        self.fn = fn
        _live.add(id(self))

    def __call__(self, fut):
        _in_callback.depth = getattr(_in_callback, "depth", 0) + 1
        try:
            out = self.fn(fut)  # no frame variable holds fn: the one reference left is _held's
        finally:
            _in_callback.depth -= 1
            _keep_released(self.fn)
            self.fn = None
        if _TEST_DELAY_S:
            _delay_release(out)
        return out

    def __del__(self):
        if _TEST_CALLBACK_DELAY_S:
            _release_after_destroy()
        _live.discard(id(self))


def then(fut, fn):
    """``fut.then(fn)``, with ``fn`` counted until the thread that ran it has released it, and
    ``fut`` and the returned future held (:func:`hold`)."""
    out = fut.then(_Callback(fn))
    hold(fut, out)
    return out


def on_done(fut, fn) -> None:
    """``fut.add_done_callback(fn)``, counted and held as :func:`then`."""
    fut.add_done_callback(_Callback(fn))
    hold(fut)


def _done(obj) -> bool:
    try:
        return obj.done() if hasattr(obj, "done") else obj.is_completed()
    except Exception:  # noqa: BLE001 - a failed work is complete too
        return True


def hold(*objs) -> None:
    """Keep ``objs`` (futures, works) referenced from Python until they have completed and
    ``HOLD_S`` has passed, so that the thread that frees them is a Python one. A pass over what
    is held (marking the completed, releasing those marked ``HOLD_S`` ago) runs when the count
    has doubled since the last pass or ``HOLD_S`` after it: O(1) per call, amortised. No pass
    runs inside a callback: a collective's thread must never be the one that releases."""
    _add([o, None] for o in objs)


def _keep_released(fn) -> None:
    """A callback's function, once run, is released as a completed held object is (a while
    later, by a thread that runs no callback), never by the collective's thread that ran it: its
    closure may own the last reference to a process group (the averager's ``self.group``, after
    the user's loop and ``dist.destroy_process_group()`` dropped the others), and a gloo
    ``ProcessGroup`` destroyed on one of its own worker threads joins that thread ("terminate
    called after throwing an instance of 'std::system_error' what(): Resource deadlock
    avoided", SIGABRT)."""
    _add([[fn, time.monotonic()]])


def _add(entries) -> None:
    global _held, _last_pass, _pass_len
    now = time.monotonic()
    released = None
    with _lock:
        _held.extend(entries)
        if getattr(_in_callback, "depth", 0) or (len(_held) < _pass_len and now - _last_pass < HOLD_S):
            return
        keep: collections.deque = collections.deque()
        for entry in _held:
            if entry[1] is None:
                if _done(entry[0]):
                    entry[1] = now
                keep.append(entry)
            elif now - entry[1] < HOLD_S:
                keep.append(entry)
        released, _held = _held, keep  # released: freed below, outside the lock
        _last_pass, _pass_len = now, max(64, 2 * len(keep))
    del released


def live_callbacks() -> int:
    return len(_live)


def held() -> int:
    return len(_held)


# test only (tests/test_exit_abort.py, the module doc): the two exit races made certain
_TEST_DELAY_S = float(os.environ.get("THINWIRE_TEST_RELEASE_DELAY_S", "0") or 0)
_TEST_CALLBACK_DELAY_S = float(os.environ.get("THINWIRE_TEST_CALLBACK_RELEASE_DELAY_S", "0") or 0)
_MAIN_IDENT = threading.main_thread().ident


def _slow_release() -> None:
    if threading.get_ident() != _MAIN_IDENT:
        time.sleep(_TEST_DELAY_S)


def _release_after_destroy() -> None:
    """A callback released by a non-main thread waits (the GIL released) until the main thread
    has destroyed the default process group, or ``_TEST_CALLBACK_DELAY_S``."""
    if threading.get_ident() == _MAIN_IDENT:
        return
    import torch.distributed as dist
    deadline = time.monotonic() + _TEST_CALLBACK_DELAY_S
    while dist.is_initialized() and time.monotonic() < deadline:
        time.sleep(0.01)


def _delay_release(out) -> None:
    import torch
    for t in (out if isinstance(out, (list, tuple)) else [out]):
        if isinstance(t, torch.Tensor):
            weakref.finalize(t, _slow_release)


def drain(timeout_s: float = DRAIN_S) -> None:
    """Wait (the GIL released) until every held future has completed and every callback has
    been released, or ``timeout_s`` (for futures that never complete)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _lock:
            pending = any(e[1] is None and not _done(e[0]) for e in _held)
        if not pending and not _live:
            return
        time.sleep(0.001)


@atexit.register
def _at_exit() -> None:
    """:func:`drain`, then keep every held object alive for good (a reference finalisation will
    never drop): a gloo thread still unwinding a chain then drops no last reference."""
    drain()
    with _lock:
        _kept.append(list(e[0] for e in _held))
        _held.clear()
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_kept))
