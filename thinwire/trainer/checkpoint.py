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
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 1


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    """Validate a checkpoint before any process starts: manifest and common file load."""
    manifest = read_manifest(path)
    try:
        torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means unreadable
        raise ValueError(f"trainer.resume={path}: common.pt is unreadable ({e.__class__.__name__})") from None
    return manifest


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

    def save(self, step: int, common: dict, shard: dict, extra=None) -> str:
        """``extra(dir)``, when given, is called on every rank to add its own files (DeepSpeed's
        sharded checkpoint) before the directory is marked complete."""
        final = os.path.join(self.root, f"step_{step:08d}")
        partial = final + ".partial"
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial, exist_ok=True)
        self._barrier()
        _atomic_save(shard, os.path.join(partial, f"rank{self.world.rank:05d}.pt"))
        if extra is not None:
            extra(partial)
        if self.world.is_main:
            _atomic_save({"version": FORMAT_VERSION, "step": step, **common}, os.path.join(partial, "common.pt"))
        self._barrier()
        if self.world.is_main:
            with open(os.path.join(partial, "COMPLETE"), "w") as fh:
                json.dump({"version": FORMAT_VERSION, "step": step, "world_size": self.world.world_size}, fh)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
        self._barrier()
        return final

    def load(self, path: str) -> tuple[dict, dict, bool]:
        """(common, this rank's shard, same world size). Resuming on another world size:
        per-rank state cannot be re-sharded meaningfully (error-feedback residuals and RNG
        streams belong to a rank's data shard), so the shard of rank 0 supplies the model
        and optimizer where those are per rank, and the caller resets the rest."""
        manifest = read_manifest(path)
        same = manifest["world_size"] == self.world.world_size
        common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
        rank = self.world.rank if same else 0
        shard = torch.load(os.path.join(path, f"rank{rank:05d}.pt"), map_location="cpu", weights_only=False)
        return common, shard, same

    def prune(self, keep: int) -> None:
        """Retention: rank 0 deletes all but the newest ``keep`` complete checkpoints."""
        if keep <= 0 or not self.world.is_main:
            return
        for old in checkpoint_dirs(os.path.dirname(self.root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world.world_size > 1:
            dist.barrier()
