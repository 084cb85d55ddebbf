"""The run dir: one owner at a time, and nothing in it lost to a rerun.

**Owner.** A job owns its run dir through an exclusive ``fcntl.flock`` on ``<run dir>/.lock``,
taken by rank 0 when the run starts and held until it ends. A second job on the same run
dir (a requeued job next to leftover workers, two sweeps pointed at one directory) fails
at once with one line naming the holder. The lock belongs to the open file, so the kernel
releases it when its process dies however it dies (SIGKILL included): an elastic restart or
a requeued job takes it over without any stale-lock cleanup. ``flock`` works across nodes on
NFS (Linux emulates it with POSIX byte-range locks there) and on Lustre mounted with
``-o flock``; on a file system without locks the run dir has no owner check.

**A rerun never overwrites.** A run dir *holds a run* when it has checkpoint directories
or a non-empty ``metrics.jsonl``. With ``trainer.resume=none`` (the default) such a run
dir is refused: ``trainer.resume=auto`` continues the run, a new ``hydra.run.dir`` starts
another one, and ``trainer.overwrite=true`` starts over after moving the old run's
checkpoints and metrics aside to ``<run dir>/previous/<time>/`` (nothing is deleted).
``trainer.resume=auto`` with checkpoints that all fail to load is refused too (see
``thinwire.trainer.resume``), rather than starting again from step 0 over them.

An elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) always resumes (``auto``): the run
dir then holds this very job's first attempt.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import socket
import tempfile
import time

import torch

from ..errors import ConfigError
from .faults import restart_count

LOCK_NAME = ".lock"


class RunDirError(ConfigError):
    """The run dir cannot be used as asked: one line, exit status 2, nothing touched."""


def effective_resume(resume: str) -> str:
    """``trainer.resume`` as this attempt uses it: an elastic restart continues (``auto``)."""
    return "auto" if restart_count() > 0 else resume


def step_dirs(run_dir: str) -> list[str]:
    """Checkpoint directories, complete or not (``.partial`` ones excluded), oldest first."""
    return sorted(d for d in glob.glob(os.path.join(run_dir, "checkpoints", "step_*"))
                  if not d.endswith(".partial") and os.path.isdir(d))


def previous_run(run_dir: str) -> str | None:
    """What makes ``run_dir`` hold a run (``"3 checkpoints and metrics.jsonl"``), or None."""
    parts = []
    n = len(step_dirs(run_dir))
    if n:
        parts.append(f"{n} checkpoint{'s' if n > 1 else ''}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        parts.append("metrics.jsonl")
    return " and ".join(parts) or None


def check_writable(run_dir: str) -> None:
    """The run dir is (or can be made) a writable directory whose ``checkpoints`` is a
    directory and whose ``metrics.jsonl`` is a file, where they exist. A run dir still to be
    made is probed by making (and removing) a directory next to where it goes (``/proc``
    refuses even root); nothing is left behind."""
    def bad(why: str) -> RunDirError:
        return RunDirError(f"hydra.run.dir={run_dir}: {why}")

    if os.path.lexists(run_dir):
        if not os.path.isdir(run_dir):
            raise bad("is a file, not a directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise bad("is not writable")
        for name, want_dir in (("checkpoints", True), ("metrics.jsonl", False)):
            p = os.path.join(run_dir, name)
            if os.path.lexists(p) and os.path.isdir(p) != want_dir:
                raise bad(f"its {name} is {'a file' if want_dir else 'a directory'}, where thinwire writes "
                          f"{'checkpoint directories' if want_dir else 'the metrics file'}; move it away")
        return
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise bad(f"{parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise bad(f"cannot be created: {parent} is not writable")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".thinwire-probe-", dir=parent))
    except OSError as e:
        raise bad(f"cannot be created in {parent} ({e.strerror or e.__class__.__name__})") from None


def check_rerun(run_dir: str, resume: str, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one (``resume=none`` without
    ``overwrite``), or to resume another run's checkpoint into it."""
    held = previous_run(run_dir)
    if held is None:
        return
    if resume == "none" and not overwrite:
        raise RunDirError(
            f"trainer.resume=none: hydra.run.dir={run_dir} already holds a run ({held}); "
            f"continue it with trainer.resume=auto, start a new run in another hydra.run.dir, or start "
            f"over here with trainer.overwrite=true (moves the old run to {run_dir}/previous/)")
    if resume not in ("none", "auto"):
        inside = os.path.realpath(os.path.join(run_dir, "checkpoints"))
        if os.path.commonpath([inside, os.path.realpath(resume)]) != inside:
            raise RunDirError(
                f"trainer.resume={resume}: hydra.run.dir={run_dir} already holds another run ({held}); "
                f"resume another run's checkpoint into a new hydra.run.dir")


def move_aside(run_dir: str) -> str | None:
    """Move the old run's checkpoints and metrics to ``<run dir>/previous/<time>/``; its path."""
    if previous_run(run_dir) is None:
        return None
    dest = os.path.join(run_dir, "previous", time.strftime("%Y-%m-%d_%H-%M-%S"))
    suffix, base = 1, dest
    while os.path.exists(dest):
        suffix += 1
        dest = f"{base}-{suffix}"
    os.makedirs(dest)
    for name in ("checkpoints", "metrics.jsonl"):
        src = os.path.join(run_dir, name)
        if os.path.lexists(src):
            os.replace(src, os.path.join(dest, name))
    return dest


def _holder(path: str) -> str:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def _busy(run_dir: str, path: str) -> RunDirError:
    return RunDirError(f"hydra.run.dir={run_dir}: the run dir is in use by another job{_holder(path)}, which "
                       f"holds {path}; wait for it to end (a dead job's lock is released by the OS), or use "
                       f"another hydra.run.dir")


class RunDirLock:
    """An exclusive ``flock`` on ``<run dir>/.lock``, held until :meth:`release` (or the
    process's death). The file keeps ``pid <pid> on <host>`` of the holder, for messages."""

    def __init__(self, run_dir: str, wait_s: float = 0.0):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        try:
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"hydra.run.dir={run_dir}: cannot create the lock file {self.path} "
                              f"({e.strerror or e.__class__.__name__})") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):  # no locks on this fs
                    break
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise _busy(run_dir, self.path) from None
                time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None


def probe_lock(run_dir: str) -> None:
    """Fail now if another job holds ``run_dir`` (the launcher's check before it starts
    workers; rank 0 takes the lock itself when the run starts)."""
    path = os.path.join(run_dir, LOCK_NAME)
    if not os.path.isfile(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise _busy(run_dir, path) from None
    finally:
        os.close(fd)


def take_run_dir(cfg, world) -> RunDirLock | None:
    """Rank 0 takes the run dir's lock and checks a rerun cannot overwrite a run; with
    ``trainer.overwrite=true`` it moves the old run aside. Every rank raises the same error
    (one line, ``agreed``) if that fails."""
    lock, error = None, None
    if world.is_main:
        try:
            lock = RunDirLock(cfg.run_dir, wait_s=30.0 if restart_count() > 0 else 2.0)
            resume = effective_resume(cfg.trainer.resume)
            overwrite = cfg.trainer.get("overwrite", False) and restart_count() == 0
            check_rerun(cfg.run_dir, resume, overwrite)
            if overwrite and resume == "none":
                moved = move_aside(cfg.run_dir)
                if moved:
                    print(f"thinwire: trainer.overwrite=true: the previous run is in {moved}", flush=True)
        except ConfigError as e:
            error = str(e)
    if world.world_size > 1:
        errors: list = [None] * world.world_size
        torch.distributed.all_gather_object(errors, error)
        error = errors[0]
    if error:
        if lock is not None:
            lock.release()
        raise RunDirError(error, agreed=True)
    return lock
