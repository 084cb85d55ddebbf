"""Where metrics go: ``metrics.jsonl`` always (rank 0), plus wandb or nothing.

``metrics.jsonl`` holds one JSON object per logged step with at least ``step``,
``loss``, ``lr``, ``step_time_s``, ``comm_wait_s``, ``wire_bytes``, ``dense_bytes``
and ``tokens_per_s`` (or ``samples_per_s``); evaluation lines add ``val_loss``.
wandb receives the same keys.
"""
from __future__ import annotations

import json
import os

from ..errors import ConfigError, one_of
from ..registry import Registry

LOGGERS = Registry("logger", "thinwire.loggers")
MODES = ("offline", "online", "disabled")


@LOGGERS.register("none")
class NullLogger:
    """The null object: ranks other than 0, and ``logger=none``. ``mode`` is accepted and
    ignored, so a preset may set ``logger.mode`` (experiment=tiny does) whatever the logger."""

    def __init__(self, mode: str = "disabled", *, run_dir: str = "", run_config: dict | None = None):
        pass

    def log(self, record: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_names(run_config: dict | None) -> dict:
    """Group, run name and tags of a run, derived from its comm / sync / optim config, so that
    dashboards sort runs by what they compare. E.g. ``comm=topk comm.ratio=0.01
    comm.feedback=ef21 sync=co2 sync.local_steps=8 optim=adamw optim.lr=1e-3`` gives group
    ``topk+ef21_co2_adamw`` (the method, so seeds and ratios of one method group together),
    name ``topk0.01+ef21_co2-H8_adamw-lr0.001`` (plus the knobs that change results) and tags
    ``comm:topk feedback:ef21 sync:co2 optim:adamw``."""
    cfg = run_config or {}
    comm, sync, optim = cfg.get("comm") or {}, cfg.get("sync") or {}, cfg.get("optim") or {}
    c, fb = comm.get("name", "none"), comm.get("feedback", "none")
    s, o = sync.get("name", "ddp"), optim.get("name", "adamw")
    feedback = f"+{fb}" if fb != "none" else ""
    ratio = f"{comm['ratio']:g}" if c in ("topk", "randk", "ternary") and "ratio" in comm else ""
    local = f"-H{sync['local_steps']}" if s != "ddp" and "local_steps" in sync else ""
    lr = f"-lr{optim['lr']:g}" if "lr" in optim else ""
    return {"group": f"{c}{feedback}_{s}_{o}",
            "name": f"{c}{ratio}{feedback}_{s}{local}_{o}{lr}",
            "tags": [f"comm:{c}", f"feedback:{fb}", f"sync:{s}", f"optim:{o}"]}


def effective_mode(mode: str) -> str:
    """wandb's mode: ``WANDB_MODE`` in the environment, if set, wins over ``logger.mode``."""
    return os.environ.get("WANDB_MODE") or mode


def wandb_logged_in() -> bool:
    """Whether ``wandb login`` (or ``WANDB_API_KEY``) gave this machine an API key: wandb reads
    it from the environment or from the netrc file (``NETRC``, else ~/.netrc) entry of its host.
    Read without importing wandb (seconds)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        with open(path) as fh:
            return f"machine {host}" in " ".join(fh.read().split())
    except OSError:
        return False


def run_id(run_dir: str) -> str:
    """The wandb run id of the run in ``run_dir``: kept in ``checkpoints/wandb_run_id`` so that a
    resumed run (``trainer.resume=auto``, an elastic restart) continues the same wandb run
    (``resume="allow"``), and a run started over (``trainer.overwrite=true`` moves
    ``checkpoints/`` aside) gets a new one."""
    import secrets

    path = os.path.join(run_dir, "checkpoints", "wandb_run_id")
    try:
        with open(path) as fh:
            saved = fh.read().strip()
        if saved:
            return saved
    except OSError:
        pass
    new = secrets.token_hex(4)  # wandb's ids: 8 characters of [a-z0-9]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(new + "\n")
    return new


@LOGGERS.register("wandb")
class WandbLogger:
    """wandb, offline by default (``logger.mode=online`` to stream, ``disabled`` to skip).

    Unset ``group`` / ``name`` are derived from comm / sync / optim (``wandb_names``; a
    ``--multirun`` sweep sets the group to the sweep), the derived tags are added to
    ``tags``, and the whole resolved config is the run's wandb config."""

    @staticmethod
    def check_options(o) -> None:
        one_of(o.mode, MODES, "mode")
        if effective_mode(o.mode) == "online" and not wandb_logged_in():  # before any rank starts
            raise ConfigError(f"mode={o.mode}: wandb is not logged in (no WANDB_API_KEY, no api.wandb.ai entry "
                              f"in ~/.netrc): run 'wandb login' first, or log offline with logger.mode=offline "
                              f"(upload later with 'wandb sync')")

    def __init__(self, project: str = "thinwire", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, name: str | None = None, tags: list[str] = (), *,
                 run_dir: str, run_config: dict | None = None):
        self.mode, self.run = mode, None
        if mode == "disabled":  # wandb.init(mode="disabled") makes a no-op run, after seconds of importing wandb
            return
        os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")  # no system-monitor thread
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        derived = wandb_names(run_config)
        tags = list(dict.fromkeys([*tags, *derived["tags"]]))  # user tags first, no duplicates
        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, entity=entity, group=group or derived["group"],
                              name=name or derived["name"], tags=tags, dir=run_dir, config=run_config,
                              reinit="finish_previous", resume="allow",
                              id=None if effective_mode(mode) == "disabled" else run_id(run_dir))

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(record, step=step)

    def finish(self) -> None:
        if self.run is None:
            return
        sync_dir = self.run.settings.sync_dir  # <run dir>/wandb/offline-run-<time>-<id>
        self.run.finish()
        # wandb's service process buffers the run file until it shuts down: flush it now, so
        # the run is on disk when we say so (and survives a later crash of this process)
        self.wandb.teardown()
        if self.mode == "offline":
            print(f"wandb: offline run saved in {sync_dir}; upload it with: wandb sync {sync_dir}", flush=True)


class MetricsFile:
    """Appends to ``<run dir>/metrics.jsonl``. On resume, lines past the resumed step (written
    after the checkpoint by a process that then died, or a torn last line) are dropped so
    steps never repeat, but only when the first new line is written: a run that fails
    before its first step leaves the file as it was."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.resume_step = resume_step
        self.fh = None

    def _open(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as fh:
                lines = fh.readlines()
            keep = [ln for ln in lines if self._before(ln)]
            if len(keep) != len(lines):
                tmp = f"{self.path}.tmp-{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in keep)
                os.replace(tmp, self.path)
        self.fh = open(self.path, "a", buffering=1)

    def _before(self, line: str) -> bool:
        try:
            return json.loads(line)["step"] <= self.resume_step
        except (ValueError, KeyError, TypeError):  # blank, or torn by a crash mid-write
            return False

    def log(self, record: dict) -> None:
        if self.fh is None:
            self._open()
        self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
