"""Every results file under bench/results carries its manifest: the command that wrote it, the
commit it ran at, the date and the machine's load, so that a number can be traced to code and
conditions. One ``MANIFEST.json`` per results folder maps each file's name to its entry::

    {"table.md": {"command": "python bench/quality.py --rows goals",
                  "commit": "<sha>", "dirty": false, "date": "2026-12-07T18:00:00Z",
                  "machine_load": "loadavg 1.52 1.40 1.31 over 2 CPUs"}}

``dirty``: the worktree had uncommitted changes to thinwire/, configs/ or bench's code (the
run's code is then the commit plus them; results files do not count). Files committed before manifests existed carry an entry
that says so (``note``; their commit and date from ``git log``, ``machine_load`` "not
recorded"). ``tests/test_bench_harness.py`` fails for any results file without an entry.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import subprocess
import sys
from typing import Iterable, Optional

from . import REPO, RESULTS

NAME = "MANIFEST.json"
FIELDS = ("command", "commit", "date", "machine_load")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"loadavg {one:.2f} {five:.2f} {fifteen:.2f} over {os.cpu_count()} CPUs"


def entry(script: str = "", argv: Optional[Iterable[str]] = None, command: Optional[str] = None) -> dict:
    """The manifest entry of a file written now by ``python <script> <argv>`` (``argv``:
    default ``sys.argv[1:]``), or by ``command`` as given."""
    if command is None:
        command = " ".join(["python", script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return {"command": command,
            "commit": _git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--", "thinwire", "configs", ":(glob)bench/**/*.py")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine_load": machine_load()}


def record(paths: Iterable[str], script: str = "", argv: Optional[Iterable[str]] = None,
           command: Optional[str] = None, note: Optional[str] = None) -> None:
    """Add (or replace) the manifest entry of each written file in ``paths``, in its folder's
    MANIFEST.json (under a lock: parallel invocations write the same folder); ``note``: what
    else a reader needs (e.g. the data a redrawn table comes from)."""
    e = {**entry(script, argv, command), **({"note": note} if note else {})}
    by_dir: dict = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(os.path.abspath(p)), []).append(os.path.basename(p))
    for d, names in by_dir.items():
        path = os.path.join(d, NAME)
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            text = fh.read()
            doc = json.loads(text) if text.strip() else {}
            doc.update({n: e for n in names})
            fh.seek(0)
            fh.truncate()
            json.dump(dict(sorted(doc.items())), fh, indent=1)
            fh.write("\n")


def write(path: str, content, script: str = "", argv: Optional[Iterable[str]] = None,
          command: Optional[str] = None, note: Optional[str] = None) -> None:
    """Write a results file (``content``: text, or a JSON document written with indent 1) and
    record its manifest entry."""
    with open(path, "w") as fh:
        if isinstance(content, str):
            fh.write(content)
        else:
            json.dump(content, fh, indent=1)
    record([path], script, argv, command, note)


CACHES = ("runs",)  # run caches (git-ignored), not results


def results_files(root: str = RESULTS) -> list[str]:
    """Every results file under ``root`` (run caches, manifests and dot files left out)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CACHES and not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f != NAME and not f.startswith(".")]
    return out


def problems(root: str = RESULTS) -> list[str]:
    """What is wrong with the manifests under ``root``: a results file without an entry, an entry
    missing a field, an entry for a file that is not there."""
    out, manifests = [], {}
    for path in results_files(root):
        d = os.path.dirname(path)
        if d not in manifests:
            m = os.path.join(d, NAME)
            manifests[d] = json.load(open(m)) if os.path.exists(m) else {}
        e = manifests[d].get(os.path.basename(path))
        if e is None:
            out.append(f"{os.path.relpath(path, root)}: no entry in {os.path.relpath(os.path.join(d, NAME), root)}")
        else:
            out += [f"{os.path.relpath(path, root)}: no {f!r}" for f in FIELDS if not e.get(f)]
    for d, doc in manifests.items():
        out += [f"{os.path.relpath(os.path.join(d, n), root)}: in {NAME} but not there" for n in doc
                if not os.path.exists(os.path.join(d, n))]
    return out
