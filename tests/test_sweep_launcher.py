"""``thinwire-sweep`` (the trainer as a ``@hydra.main`` app) and the submitit SLURM launcher
config: every combination validated before launch; each job runs thinwire-train in its own
run dir, in one wandb group; ``hydra/launcher=slurm`` composes and turns into the expected
sbatch array job (with fake ``srun``/``sbatch`` on PATH: nothing reaches a cluster)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from thinwire import hydra_app
from thinwire.config import config_dir

SLURM_YAML = os.path.join(config_dir(), "hydra", "launcher", "slurm.yaml")
TINY = ["experiment=tiny", "trainer.max_steps=2", "trainer.eval_every=2", "dist.nproc=1"]


def test_bad_value_fails_before_anything_is_launched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hydra_app.subprocess, "run", lambda *a, **k: pytest.fail("a job was launched"))
    rc = hydra_app.main(["--multirun", *TINY, "comm=topk", "comm.ratio=0.1,1.5", f"hydra.sweep.dir={tmp_path}/s"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("thinwire-sweep: error: ") and "comm.ratio=1.5" in err
    assert not (tmp_path / "s").exists()


def test_slurm_launcher_needs_srun(tmp_path, capsys, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    monkeypatch.setattr(hydra_app.shutil, "which", lambda name: None)
    assert hydra_app.main(["--multirun", "hydra/launcher=slurm", "comm=none", f"hydra.sweep.dir={tmp_path}/s"]) == 2
    err = capsys.readouterr().err
    assert err == "thinwire-sweep: error: hydra/launcher=slurm: no srun on PATH; submit from a SLURM login node\n"


class Done:
    returncode = 0


def test_each_job_gets_its_run_dir_and_the_sweep_group(tmp_path, monkeypatch):
    """Hydra's basic launcher in this process; the trainer processes are recorded, not run."""
    calls = []
    monkeypatch.setattr(hydra_app.subprocess, "run", lambda cmd, **k: calls.append(cmd) or Done())
    sweep = tmp_path / "sweep"
    assert hydra_app.main(["--multirun", *TINY, "comm=none,bf16", f"hydra.sweep.dir={sweep}"]) == 0
    assert len(calls) == 2
    group = f"++logger.group={str(sweep).replace('/', '_')}"
    for n, (cmd, comm) in enumerate(zip(calls, ("none", "bf16"))):
        assert cmd[:3] == [sys.executable, "-m", "thinwire.train"]
        assert cmd[3:] == [*TINY, f"comm={comm}", f"hydra.run.dir={sweep / str(n)}", group]
        # the overrides Hydra recorded for the job (what thinwire-report shows)
        assert yaml.safe_load(open(sweep / str(n) / ".hydra" / "overrides.yaml")) == [*TINY, f"comm={comm}"]
    # a group given on the command line is kept
    calls.clear()
    assert hydra_app.main(["--multirun", *TINY, "logger.group=mine", "comm=none",
                           f"hydra.sweep.dir={tmp_path}/s2"]) == 0
    assert [a for a in calls[0] if a.startswith("logger.group=")] == ["logger.group=mine"]


@pytest.mark.extended  # a CLI launch through the sweep app
@pytest.mark.slow
def test_a_job_really_trains(tmp_path):
    """One job end to end: thinwire-train in a fresh process writes the run dir Hydra chose."""
    sweep = tmp_path / "sweep"
    assert hydra_app.main(["--multirun", *TINY, "comm=bf16", f"hydra.sweep.dir={sweep}"]) == 0
    lines = open(sweep / "0" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2
    ckpt = torch.load(sweep / "0" / "checkpoints" / "step_00000002" / "common.pt", weights_only=False)
    cfg = OmegaConf.create(ckpt["config"])
    assert cfg.run_dir == str(sweep / "0") and cfg.comm.name == "bf16"
    assert cfg.logger.group == str(sweep).replace("/", "_")


def test_failed_job_fails_the_sweep(tmp_path, monkeypatch, capsys):
    class Failed:
        returncode = 3

    monkeypatch.setattr(hydra_app.subprocess, "run", lambda cmd, **k: Failed())
    assert hydra_app.main(["--multirun", *TINY, "comm=none", f"hydra.sweep.dir={tmp_path}/s"]) == 1
    assert f"thinwire-train exited with status 3 in {tmp_path}/s/0" in capsys.readouterr().err


def test_slurm_yaml_composes_as_plain_omegaconf():
    """Without the plugin: the file is valid YAML whose interpolations resolve against a run config."""
    node = OmegaConf.load(SLURM_YAML)
    assert list(node.defaults) == ["submitit_slurm", "_self_"]
    root = OmegaConf.create({"dist": {"nproc": 8}, "hydra": {"sweep": {"dir": "multirun/x"}},
                             "launcher": OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])})
    launcher = OmegaConf.to_container(root.launcher, resolve=True)
    assert launcher["gpus_per_node"] == 8 and launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
    assert launcher["submitit_folder"] == "multirun/x/.submitit/%j"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``srun`` (so submitit believes it is on a cluster) and ``sbatch`` (keeps the script)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\necho "Submitted batch job 4242"\n')
    for f in ("srun", "sbatch"):
        (fake / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    return fake


def test_slurm_launcher_submits_one_array_job(tmp_path, fake_slurm, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from thinwire.config import register_schemas

    register_schemas()
    sweep = tmp_path / "sweep"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "dist.nproc=8", "hydra.launcher.partition=gpu",
                                 f"hydra.sweep.dir={sweep}"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.config = cfg  # what Launcher.setup stores; launch() needs nothing else
    # the jobs are submitted; reading their results would wait on SLURM
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: [self.job_id])
    jobs = [["comm=none"], ["comm=topk", "comm.ratio=0.01"], ["comm=int8"]]
    assert launcher.launch(jobs, initial_job_idx=0) == ["4242_0", "4242_1", "4242_2"]

    script = (fake_slurm / "submitted.sh").read_text().splitlines()
    sbatch = {ln.split("=", 1)[0][len("#SBATCH "):]: ln.split("=", 1)[1] for ln in script
              if ln.startswith("#SBATCH --") and "=" in ln}
    assert sbatch["--array"] == "0-2%3"  # three jobs, all at once (array_parallelism 64 caps larger sweeps)
    assert sbatch["--nodes"] == "1" and sbatch["--ntasks-per-node"] == "1"
    assert sbatch["--gpus-per-node"] == "8" and sbatch["--partition"] == "gpu"
    assert sbatch["--time"] == "240" and sbatch["--job-name"] == "thinwire"
    assert sbatch["--output"].startswith(str(sweep / ".submitit"))
    assert any("srun" in ln and "submitit.core._submit" in ln for ln in script)

    # each array task unpickles (launcher, its overrides, job dir key, job number), in a process
    # of its own as on the cluster: unpickling here would make cloudpickle write the pickled
    # dataclass fields back onto this process's live (dynamic) schema classes
    pickles = sorted(glob.glob(str(sweep / ".submitit" / "4242_*" / "*_submitted.pkl")))
    assert len(pickles) == 3
    read = ("import cloudpickle, json, sys\n"
            "print(json.dumps([list(cloudpickle.load(open(p, 'rb')).args[:3]) for p in sys.argv[1:]]))")
    out = subprocess.run([sys.executable, "-c", read, *pickles], capture_output=True, text=True, check=True).stdout
    submitted = sorted(json.loads(out), key=lambda a: a[2])
    assert submitted == [[j, "hydra.sweep.dir", n] for n, j in enumerate(jobs)]
