"""``thinwire-sweep``: the trainer as a plain ``@hydra.main`` app, so that Hydra's launcher
plugins can run sweeps, above all hydra-submitit-launcher (one SLURM job per combination):

    thinwire-sweep --multirun hydra/launcher=slurm dist.nproc=8 comm=none,topk,int8

``thinwire-train --multirun`` runs a sweep's jobs one after the other in one process group;
a launcher plugin instead runs each job wherever it puts it (a SLURM node, a local
subprocess). Each job runs ``python -m thinwire.train <its overrides>`` in a fresh process
on that node, in the job's directory ``<hydra.sweep.dir>/<n>`` (the same layout as
``thinwire-train --multirun``), with one wandb group per sweep unless ``logger.group`` is
given; ``thinwire.train`` then starts ``dist.nproc`` local workers (one per GPU). A fresh
process, not a call, because the job function runs inside Hydra's and submitit's globals,
and thinwire composes its config on its own.

Before anything is submitted every combination is composed and validated here, so a bad
value fails at once (exit 2, one line) rather than in a queued job.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import ConfigError, compose
from .config import register_schemas
from .config import expand_sweep
from .config import validate

PROG = "thinwire-sweep"
SUBMITIT = ("slurm", "submitit_slurm", "submitit_local")


def job_command(task_overrides: list[str], output_dir: str, sweep_dir: str | None) -> list[str]:
    """The trainer command of one job: its overrides, its directory, the sweep's wandb group."""
    extra = [f"hydra.run.dir={output_dir}"]
    if sweep_dir is not None and not any(o.startswith("logger.group=") for o in task_overrides):
        extra.append(f"++logger.group={sweep_dir.replace('/', '_')}")  # as thinwire-train --multirun
    return [sys.executable, "-m", "thinwire.train", *task_overrides, *extra]


def run_job(cfg: DictConfig) -> int:
    """The task function of every job (on the node the launcher chose)."""
    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    cmd = job_command(list(hc.overrides.task), hc.runtime.output_dir, hc.sweep.dir if multirun else None)
    rc = subprocess.run(cmd).returncode
    if rc != 0:  # fails the Hydra job, and with submitit the SLURM job
        raise RuntimeError(f"thinwire-train exited with status {rc} in {hc.runtime.output_dir}")
    return rc


def check(argv: list[str]) -> None:
    """Compose and validate every job of the sweep (or the one run) before launching."""
    launcher = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra/launcher=", "+hydra/launcher="))]
    if launcher and launcher[-1] in SUBMITIT:
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        except ImportError:
            raise ConfigError(f"hydra/launcher={launcher[-1]}: needs hydra-submitit-launcher "
                              f"(pip install 'thinwire[slurm]')") from None
        if launcher[-1] != "submitit_local" and shutil.which("srun") is None:
            raise ConfigError(f"hydra/launcher={launcher[-1]}: no srun on PATH; submit from a SLURM login node")
    multirun = any(a in ("-m", "--multirun") for a in argv)
    rest = [a for a in argv if a not in ("-m", "--multirun")]
    jobs = expand_sweep(rest) if multirun else [rest]
    for job in jobs:
        validate(compose(job))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("-h", "--help", "--hydra-help", "--cfg", "-c", "--info", "-i") for a in argv):
        try:
            check(argv)
        except ConfigError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            return 2
    register_schemas()
    app = hydra.main(version_base="1.3", config_path="pkg://thinwire.configs", config_name="train")(run_job)
    saved = sys.argv
    sys.argv = [PROG, *argv]
    try:
        app()
    except SystemExit as e:  # Hydra exits 1 when a job failed (after reporting its error)
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
