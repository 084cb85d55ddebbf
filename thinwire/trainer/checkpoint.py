"""Checkpoints: atomic, sharded by rank, resumable bitwise on CPU.

Layout under ``<run dir>/checkpoints/``::

    step_00000200/
        common.pt        rank 0: step, config, world size, model + optimizer (when ranks agree)
        rank00000.pt     every rank: RNG states, comm-hook / sync / plugin state, and model +
        rank00001.pt     optimizer when ranks hold different parameters (local updates, CO2)
        COMPLETE         written last; a directory without it is not a checkpoint

Every rank writes its file to ``step_X.partial/`` (temp file + ``os.replace``); after a
barrier rank 0 writes ``COMPLETE`` and renames the directory to ``step_X``. A crash at
any point leaves either the previous checkpoint or a ``.partial`` directory that resume
ignores. The data position is the step itself (batches are a pure function of it).

**Loading is safe.** Every file is read with ``torch.load(weights_only=True)``: PyTorch's
restricted unpickler builds tensors, containers and numbers only and refuses any other
global, so a crafted checkpoint (in a run dir, or given as ``trainer.resume=<path>``) cannot
run code. The state written here is only of those types (the numpy RNG state is stored as a
list of ints). Checkpoints written by earlier versions hold the numpy RNG state as an array:
they load with numpy's array constructor allowed (``SAFE_NUMPY_GLOBALS``: it builds arrays
of plain data and nothing else), so they resume as before. A file that needs anything more
is refused with one line, never loaded unsafely. DeepSpeed's own checkpoint files
(``engine=deepspeed``) are read by DeepSpeed's loader, which unpickles them: see
``TrainerConfig.trust_checkpoints``.

**Never a non-finite "good" state.** ``assert_finite`` runs before every save: a model whose
parameters hold inf or NaN is not checkpointed; the run fails naming the step instead.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from ..errors import one_line

FORMAT_VERSION = 1


def _numpy_globals() -> list:
    """What an earlier version's numpy RNG state (a uint32 array) needs to unpickle."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


SAFE_NUMPY_GLOBALS = _numpy_globals()


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that loading with ``weights_only=True`` refuses."""


def _why(name: str, e: BaseException) -> str:
    """A one-line reason for a failed load of file ``name``."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if m:
        return f"{name} is refused: loading it would call {m.group(1)} (a checkpoint holds tensors and plain data only)"
    if isinstance(e, FileNotFoundError):
        return f"{name} is missing"
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{name} is unreadable ({e.__class__.__name__}{': ' + first[:120] if first else ''})"


def safe_load(path: str):
    """``torch.load(path, weights_only=True)`` to CPU, with earlier versions' numpy RNG
    arrays allowed; any failure is a ``ValueError`` with a one-line reason (a crafted file:
    :class:`UnsafeCheckpointError`)."""
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, truncation, I/O: all mean "unusable"
        why = _why(os.path.basename(path), e)
        raise (UnsafeCheckpointError if " is refused: " in why else ValueError)(why) from None


def assert_finite(named_tensors, step: int) -> None:
    """Raise ``FloatingPointError`` naming the first parameter with inf or NaN."""
    for name, t in named_tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"parameter {name} is not finite at step {step}")


class CheckpointWriteError(OSError):
    pass


def fsync_dir(path: str) -> None:
    """Make a directory's entries (the files renamed into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save(obj, path: str, fault: "OSError | None" = None) -> None:
    """Write to a temporary file, then rename. A failed write (a full disk makes torch's zip
    writer say only "unexpected pos 64 vs 0") is reported with the path and the free space.
    ``fault``: an error to meet after the temporary file is written (``trainer.faults.ckpt_fail_at``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:  # on disk before the rename makes it visible (power loss)
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if fault is not None:
            raise fault
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        try:
            free = f"{shutil.disk_usage(os.path.dirname(path)).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)[:200]
        raise CheckpointWriteError(f"could not write checkpoint file {path} ({free}): {detail}") from e


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))  # plain data: loads safely
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    dirs = [d for d in glob.glob(os.path.join(run_dir, "checkpoints", "step_*"))
            if not d.endswith(".partial") and os.path.exists(os.path.join(d, "COMPLETE"))]
    return sorted(dirs)


def read_manifest(path: str) -> dict:
    """The COMPLETE manifest of a checkpoint directory; raises ValueError if unusable."""
    try:
        with open(os.path.join(path, "COMPLETE")) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"trainer.resume={path}: not a readable thinwire checkpoint ({e.__class__.__name__})") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"trainer.resume={path}: checkpoint format {manifest.get('version')} "
                         f"is not {FORMAT_VERSION}")
    return manifest


def check_loadable(path: str) -> dict:
    """Validate a checkpoint before any process starts: its manifest, the common file loads
    (safely) and every rank file is there. Returns the common file's contents."""
    manifest = read_manifest(path)
    try:
        common = safe_load(os.path.join(path, "common.pt"))
    except ValueError as e:
        raise e.__class__(f"trainer.resume={path}: {e}") from None
    missing = [f"rank{r:05d}.pt" for r in range(int(manifest.get("world_size", 0)))
               if not os.path.isfile(os.path.join(path, f"rank{r:05d}.pt"))]
    if missing:
        raise ValueError(f"trainer.resume={path}: {missing[0]} is missing")
    for r in range(int(manifest.get("world_size", 0))):  # a truncated file has no zip directory at its end
        name = f"rank{r:05d}.pt"
        try:
            with zipfile.ZipFile(os.path.join(path, name)):
                pass
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"trainer.resume={path}: {name} is unreadable (truncated or not a torch file: "
                             f"{one_line(e)})") from None
    return common


def unusable_reason(path: str) -> str:
    """Why ``path`` (a ``step_*`` directory) cannot be resumed from, in a few words."""
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        return "no COMPLETE marker (an unfinished write)"
    try:
        check_loadable(path)
    except ValueError as e:
        return str(e)[len(f"trainer.resume={path}: "):] if str(e).startswith("trainer.resume=") else str(e)
    return "unreadable on some rank"


def resume_candidates(run_dir: str, resume: str) -> list[str]:
    """Checkpoints to try, newest first: all complete ones for ``auto``, the given one for a
    path, none for ``none``. The trainer falls back down this list when one fails to load."""
    if resume == "none":
        return []
    if resume == "auto":
        return checkpoint_dirs(run_dir)[::-1]
    return [resume]


class Checkpointer:
    def __init__(self, run_dir: str, world):
        self.root = os.path.join(run_dir, "checkpoints")
        self.world = world
        self.write_fault = lambda step: None  # step -> OSError | None (thinwire.trainer.faults)

    def save(self, step: int, common: dict, shard: dict, extra=None) -> str:
        """``extra(dir)``, when given, is called on every rank to add its own files (DeepSpeed's
        sharded checkpoint) before the directory is marked complete."""
        final = os.path.join(self.root, f"step_{step:08d}")
        partial = final + ".partial"
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial, exist_ok=True)
        self._barrier()
        _atomic_save(shard, os.path.join(partial, f"rank{self.world.rank:05d}.pt"), self.write_fault(step))
        if extra is not None:
            extra(partial)
        if self.world.is_main:
            _atomic_save({"version": FORMAT_VERSION, "step": step, **common}, os.path.join(partial, "common.pt"))
        self._barrier()
        if self.world.is_main:
            with open(os.path.join(partial, "COMPLETE"), "w") as fh:
                json.dump({"version": FORMAT_VERSION, "step": step, "world_size": self.world.world_size}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(partial)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_dir(os.path.dirname(final))
        self._barrier()
        return final

    def load(self, path: str) -> tuple[dict, dict, bool]:
        """(common, this rank's shard, same world size). Resuming on another world size:
        per-rank state cannot be re-sharded meaningfully (error-feedback residuals and RNG
        streams belong to a rank's data shard), so the shard of rank 0 supplies the model
        and optimizer where those are per rank, and the caller resets the rest."""
        manifest = read_manifest(path)
        same = manifest["world_size"] == self.world.world_size
        common = safe_load(os.path.join(path, "common.pt"))
        rank = self.world.rank if same else 0
        shard = safe_load(os.path.join(path, f"rank{rank:05d}.pt"))
        return common, shard, same

    def prune(self, keep: int) -> None:
        """Retention: rank 0 deletes all but the newest ``keep`` complete checkpoints
        (``trainer.keep_checkpoints``, 3 by default; 0 keeps all)."""
        if keep <= 0 or not self.world.is_main:
            return
        for old in checkpoint_dirs(os.path.dirname(self.root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world.world_size > 1:
            dist.barrier()
