"""Every command in README.md's ```bash blocks works verbatim after the quickstart: the
quickstart's in the default tier, the others in the extended tier (docs/: tests/test_docs.py).

The commands are extracted from the README (continuation lines joined, comments dropped) and
each must match one rule below, so a new README command fails here until it is covered:

- ``bash launch/demo.sh``: run for real (a copy of launch/ whose .venv is this interpreter),
  with ``trainer.max_steps=2`` appended: it must print the run dir, val loss and a sample;
- ``thinwire-train ...``: trained for 2 steps on the session's pooled ranks (``pools.train``,
  the path ``--multirun`` takes), in a run dir under tmp_path, on ``experiment=tiny``'s model
  unless the command names an experiment; a ``--multirun`` sweep trains its first two
  combinations and validates the others; ``experiment=minilm_*`` and
  ``engine=deepspeed`` (a pretrained model / DeepSpeed's start-up: tens of seconds) are
  composed and validated only, as ``thinwire-train ... --cfg job``; so is ``elastic=torchft``
  as written (it runs whole rounds, not 2 steps; tests/test_elastic_trainer.py trains it);
- ``torchrun ... -m thinwire.train ...`` (8 GPUs, several nodes) and the ``launch/*.sh``
  scripts (``DRY_RUN=1``): the launcher must use the venv's python, and the trainer's
  overrides must validate at the launcher's world size (``--cfg job`` with WORLD_SIZE set);
- ``thinwire-sweep --multirun hydra/launcher=slurm ...`` off a cluster: the one line that
  says to submit from a SLURM login node; its overrides validate without the launcher;
- ``thinwire-report runs/demo runs/demo_comm=int8``: run on two such run dirs;
- not run here (said why in SKIP): the test suite itself, ``pip install`` (network),
  ``sbatch`` (tests/test_launch.py dry-runs it), benchmarks of minutes to hours.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "data.eval_batches=2", "trainer.sample_chars=0",
        "logger.mode=disabled"]
SKIP = {"bash launch/test.sh": "the test suite itself",
        "source .venv/bin/activate": "the quickstart's activation (its venv is this interpreter's)",
        "pip install": "needs the network (the extras are installed here)",
        "sbatch": "a SLURM submission (tests/test_launch.py dry-runs launch/slurm.sbatch)",
        "python bench/": "a benchmark of minutes to hours (bench/*.py)",
        "sudo python bench/": "a benchmark of an hour, as root (network namespaces)"}


def readme_commands(section: str | None = None, exclude: str | None = None, path: str = "README.md") -> list[str]:
    """The commands of the file's ```bash blocks; ``section``: only those under the ``## ``
    heading of that name; ``exclude``: all but those."""
    with open(os.path.join(REPO, path)) as fh:
        text = fh.read()
    out = []
    for head, body in re.findall(r"(?m)^## (.*)\n((?:(?!^## ).*\n?)*)", "## \n" + text):
        if (section is not None and head != section) or (exclude is not None and head == exclude):
            continue
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    out.append(line)
    return out


def fake_venv(tmp_path):
    """A copy of launch/ + pyproject.toml whose .venv/bin/python runs this interpreter, with
    setup_env.sh's stamp in place (nothing is installed)."""
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "launch"), root / "launch")
    shutil.copy(os.path.join(REPO, "pyproject.toml"), root / "pyproject.toml")
    (root / ".venv" / "bin").mkdir(parents=True)
    py = root / ".venv" / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    py.chmod(0o755)
    digest = subprocess.run(["sha1sum", str(root / "pyproject.toml")], capture_output=True, text=True,
                            check=True).stdout[:12]
    (root / ".venv" / f".thinwire-{digest}").touch()
    return root, str(py)


def env_for(root) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "THINWIRE_VENV", "NPROC")}
    env.update(PYTHONPATH=REPO, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def validate_only(capsys, monkeypatch, overrides: list[str], world: int | None = None) -> None:
    """``thinwire-train <overrides> --cfg job``, in this process; ``world``: as under torchrun."""
    from thinwire.train import main

    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(min(world, 8)))
    assert main([*overrides, "--cfg", "job"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "optim:" in out and "trainer:" in out
    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def trainer_overrides(argv: list[str]) -> list[str]:
    i = argv.index("thinwire.train")
    return [a for a in argv[i + 1:] if a != "..."]


def small(overrides: list[str]) -> list[str]:
    """The command's overrides, on the tiny model unless it names an experiment, for 2 steps."""
    base = [] if any(a.startswith("experiment=") for a in overrides) else ["experiment=tiny"]
    return [*base, *[a for a in overrides if a != "--multirun"], *TINY]


def torchrun_world(argv: list[str]) -> int:
    flags = dict(a.lstrip("-").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    return int(flags.get("nnodes", "1").split(":")[-1]) * int(flags.get("nproc_per_node", "1"))


def test_the_quickstart_is_first_and_every_command_is_in_one_tier():
    assert readme_commands("Quickstart") == ["bash launch/demo.sh", "bash launch/test.sh", "source .venv/bin/activate"], \
        "the quickstart activates the venv that the commands below need"
    assert readme_commands() == readme_commands("Quickstart") + readme_commands(exclude="Quickstart")


@pytest.mark.slow
def test_readme_quickstart_runs_verbatim(tmp_path, pools, capsys, monkeypatch):
    """The default tier: the quickstart's demo (a real launch of launch/demo.sh)."""
    run_verbatim(readme_commands("Quickstart"), {"demo"}, tmp_path, pools, capsys, monkeypatch)


@pytest.mark.extended  # ~15 s: every other README command
@pytest.mark.slow
def test_readme_commands_run_verbatim(tmp_path, pools, capsys, monkeypatch):
    run_verbatim(readme_commands(exclude="Quickstart"),
                 {"launch", "torchrun", "sweep", "multirun", "train", "validated", "report"},
                 tmp_path, pools, capsys, monkeypatch)


def run_verbatim(commands, kinds, tmp_path, pools, capsys, monkeypatch, skip_rules=None):
    """Run every command by the module docstring's rules; ``kinds``: the rules that must have
    been used (each command must match one); ``skip_rules``: prefix -> why it is not run
    (default SKIP)."""
    skip_rules = SKIP if skip_rules is None else skip_rules
    from thinwire.hydra_app import check as sweep_check
    from thinwire.errors import ConfigError

    root, venv_python = fake_venv(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen = set()
    for n, cmd in enumerate(commands):
        argv = shlex.split(cmd.replace("$PWD", str(root)).replace("$MASTER_ADDR", "node0"))
        env_vars = {}
        while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
            k, v = argv.pop(0).split("=", 1)
            env_vars[k] = v
        skip = next((why for prefix, why in skip_rules.items() if cmd.startswith(prefix)
                     or " ".join(argv).startswith(prefix)), None)
        if skip:
            seen.add("skip")
            continue
        run_dir = str(tmp_path / f"cmd{n}")
        if argv[:2] == ["bash", "launch/demo.sh"]:
            p = subprocess.run(["bash", "launch/demo.sh", *argv[2:], *TINY[:2]], cwd=root, env=env_for(root),
                               capture_output=True, text=True, timeout=240)
            assert p.returncode == 0, p.stderr[-3000:]
            name = "runs/demo_trainer.max_steps=2_trainer.eval_every=2"  # a run dir per override set
            assert p.stdout.startswith(f"thinwire: run dir {name}"), p.stdout[:500]
            assert "val_loss" in p.stdout and "sample:" in p.stdout, p.stdout[-2000:]
            assert (root / name / "metrics.jsonl").exists()
            seen.add("demo")
        elif argv[:2] == ["bash", "launch/torchrun.sh"] or argv[:2] == ["bash", "launch/multinode.sh"]:
            env = {**env_for(root), **env_vars, "DRY_RUN": "1"}
            p = subprocess.run(["bash", argv[1], *argv[2:]], cwd=root, env=env, capture_output=True, text=True,
                               timeout=30)
            assert p.returncode == 0, p.stderr
            printed = shlex.split(p.stdout.strip().splitlines()[-1])
            assert printed[0] == venv_python, f"{cmd}: starts {printed[0]}, not the venv's python"
            nnodes = int(env_vars.get("NNODES", "1"))
            validate_only(capsys, monkeypatch, trainer_overrides(printed), nnodes * int(env_vars.get("NPROC", "1")))
            seen.add("launch")
        elif argv[0] == "torchrun":
            validate_only(capsys, monkeypatch, trainer_overrides(argv), torchrun_world(argv))
            seen.add("torchrun")
        elif argv[0] == "thinwire-sweep":
            with pytest.raises(ConfigError, match="no srun on PATH; submit from a SLURM login node"):
                sweep_check(argv[1:])
            rest = [a for a in argv[1:] if not a.startswith(("hydra/launcher=", "hydra.launcher."))]
            sweep_check([*rest, f"hydra.sweep.dir={run_dir}"])
            seen.add("sweep")
        elif argv[0] == "thinwire-train" and "--multirun" in argv:
            from thinwire.config import expand_sweep

            jobs = expand_sweep([*small(argv[1:]), f"hydra.sweep.dir={run_dir}"])
            assert len(jobs) > 1
            for job in jobs[2:]:
                validate_only(capsys, monkeypatch, job)
            for job in jobs[:2]:  # the first two combinations train; the others validate
                assert pools.train(*job).record["step"] == 2
            seen.add("multirun")
        elif argv[0] == "thinwire-train":
            overrides = [*small(argv[1:]), f"hydra.run.dir={run_dir}"]
            if any(a.startswith(("experiment=minilm", "engine=deepspeed")) for a in argv):
                validate_only(capsys, monkeypatch, overrides)
                seen.add("validated")
            elif "elastic=torchft" in argv:  # whole rounds: validated as written, trained by tests/test_elastic_trainer.py
                validate_only(capsys, monkeypatch, [*argv[1:], f"hydra.run.dir={run_dir}"])
                seen.add("validated")
            else:
                run = pools.train(*overrides)
                assert run.record["step"] == 2 and "val_loss" in run.record, cmd
                seen.add("train")
        elif argv[0] == "thinwire-report":
            from thinwire.report import main as report

            for d in argv[1:]:
                if not d.startswith("-") and d.startswith("runs/"):  # made by the quickstart and its suggestion
                    pools.train("experiment=tiny", *(["comm=int8"] if "int8" in d else []), *TINY,
                                f"hydra.run.dir='{tmp_path / d}'")
            assert report(argv[1:]) in (0, None)
            assert (tmp_path / "report" / "summary.md").exists()
            seen.add("report")
        else:
            pytest.fail(f"README command not covered by tests/test_readme.py: {cmd}")
    assert kinds <= seen, seen
