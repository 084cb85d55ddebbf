"""The one runner: a row's run is ``thinwire-train`` (or, for torch's peers,
``harness/cluster_peer.py --protocol`` under torchrun) in a run dir named by its overrides
**and thinwire's code version**, reused when complete.

``code_version()`` hashes the sources that decide what a run computes: every file under
``thinwire/`` and ``configs/`` (not docs, tests or bench/). A run dir is
``<root>/<kind->sha1(overrides, code version)[:12]``, so after any change to thinwire's code
or configs every cached run, the dense baseline included, runs again instead of being
reused beside results of other code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional

from . import BENCH, REPO

SOURCES = ("thinwire", "configs")  # relative to the repository root


def code_version(root: Optional[str] = None, sources: tuple = SOURCES) -> str:
    """sha1 (12 hex digits) of every file under ``root``/``sources`` (default: this repository's
    thinwire/ and configs/; relative path and bytes, in sorted order, ``__pycache__`` and
    ``*.pyc`` left out). Cached per process: ``code_version.cache_clear()`` after changing the
    sources in the same process."""
    return _tree_hash(root or REPO, tuple(sources))


@functools.lru_cache(maxsize=None)
def _tree_hash(root: str, sources: tuple) -> str:
    h = hashlib.sha1()
    for src in sources:
        base = os.path.join(root, src)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".pyc"):
                    continue
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(hashlib.sha1(fh.read()).digest())
    return h.hexdigest()[:12]


code_version.cache_clear = _tree_hash.cache_clear  # type: ignore[attr-defined]


def run_key(ov: list[str], code: Optional[str] = None) -> str:
    """The cache key of a run: its overrides and the code version it runs."""
    blob = json.dumps({"overrides": ov, "code": code_version() if code is None else code})
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_dir(root: str, ov: list[str], kind: str = "", code: Optional[str] = None) -> str:
    return os.path.join(root, f"{kind}-{run_key(ov, code)}" if kind else run_key(ov, code))


def rows_of(d: str) -> list[dict]:
    """The run's metrics.jsonl rows ([] when it has none)."""
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def done(d: str, steps: int) -> Optional[dict]:
    """The run's last metrics row when it completed ``steps`` steps with an evaluation, else None."""
    rows = rows_of(d)
    return rows[-1] if rows and rows[-1]["step"] == steps and "val_loss" in rows[-1] else None


def wait_for(d: str) -> None:
    """Block while another invocation's run holds ``d`` (thinwire's run-dir ``flock``), so
    parallel invocations share runs instead of starting them twice."""
    path = os.path.join(d, ".lock")
    if os.path.exists(path):
        import fcntl

        with open(path) as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)  # granted once the holder has finished


def train(ov: list[str], d: str, cmd: Optional[list[str]] = None) -> list[dict]:
    """One run of ``ov`` in ``d`` (``thinwire-train``, or ``cmd`` followed by ``ov``); its metrics
    rows. A failed run raises RuntimeError with the end of its stderr."""
    cmd = [*(cmd or [sys.executable, "-m", "thinwire.train"]), *ov, f"hydra.run.dir={d}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(ov)} failed:\n{p.stderr[-3000:]}")
    return rows_of(d)


def peer_cmd(flags: list[str], nproc: int) -> list[str]:
    """The command (before the run's overrides) of a run with torch's peer ``flags``
    (``harness/cluster_peer.py --protocol``: thinwire's Trainer with torch's hook) on ``nproc`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            os.path.join(BENCH, "cluster_peer.py"), "--protocol", *flags, "--"]


EXTRA: list[str] = []  # launch-only overrides (quality's --launch), not part of a run's identity


def launch(ov: list[str], d: str, meta: dict, label: str, fresh: bool = True) -> None:
    """Run ``ov`` in run dir ``d`` (``meta``, ``ov`` and the code version saved beside the run):
    ``thinwire-train``, or for a torch peer row (``--`` flags in ``ov``: the peer's)
    ``harness/cluster_peer.py --protocol`` under torchrun, one process per rank. ``fresh``: an
    unfinished earlier attempt is started over; else ``ov`` says how the run starts (e.g.
    ``trainer.resume=...``)."""
    flags = [o for o in ov if o.startswith("--")]
    rest = [o for o in ov if not o.startswith("--")]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "overrides.json"), "w") as fh:
        json.dump({**meta, "overrides": ov, "code_version": code_version()}, fh)
    cmd = None
    if flags:
        cmd = peer_cmd(flags, next(int(o.split("=", 1)[1]) for o in rest if o.startswith("dist.nproc=")))
    t0 = time.perf_counter()
    try:
        train([*rest, *EXTRA, *(["trainer.overwrite=true"] if fresh else [])], d, cmd)
    except RuntimeError as e:
        raise SystemExit(f"{label} failed:\n{str(e).split(chr(10), 1)[-1]}") from None
    print(f"  ran {label} in {time.perf_counter() - t0:.0f} s", flush=True)
