"""Where metrics go: ``metrics.jsonl`` always (rank 0), plus wandb or nothing.

``metrics.jsonl`` holds one JSON object per logged step with at least ``step``,
``loss``, ``lr``, ``step_time_s``, ``comm_wait_s``, ``wire_bytes``, ``dense_bytes``
and ``tokens_per_s`` (or ``samples_per_s``); evaluation lines add ``val_loss``.
wandb receives the same keys.
"""
from __future__ import annotations

import json
import os


class NullLogger:
    """The null object: ranks other than 0, and ``logger=none``."""

    def __init__(self, **_ignored):
        pass

    def log(self, record: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """wandb, offline by default (``logger.mode=online`` to stream, ``disabled`` to skip)."""

    def __init__(self, project: str = "thinwire", mode: str = "offline", entity=None, group=None,
                 name=None, tags=(), *, run_dir: str, run_config: dict | None = None):
        os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")  # no system-monitor thread
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.mode = mode
        self.run = wandb.init(project=project, mode=mode, entity=entity, group=group, name=name,
                              tags=list(tags), dir=run_dir, config=run_config, reinit="finish_previous")

    def log(self, record: dict, step: int) -> None:
        self.run.log(record, step=step)

    def finish(self) -> None:
        self.run.finish()
        if self.mode == "offline":
            print(f"wandb: offline run saved; upload it with 'wandb sync {self.run.dir}/..'", flush=True)


class MetricsFile:
    """Appends to ``<run dir>/metrics.jsonl``; on resume drops lines past the resumed step
    (written after the checkpoint by a process that then died) so steps never repeat."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as fh:
                keep = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(keep)
        self.fh = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.fh.close()
