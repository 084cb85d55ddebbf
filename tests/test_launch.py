"""launch/ scripts: their DRY_RUN=1 output is the torchrun / srun command they would run."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/torchrun.sh", "launch/multinode.sh", "launch/slurm.sbatch")
OVERRIDES = ["comm=topk", "comm.ratio=0.01", "hydra.run.dir=runs/x y"]
SCRUB = ("NPROC", "NNODES", "NODE_RANK", "RDZV_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHRUN_ARGS", "PYTHON",
         "VIRTUAL_ENV", "THINWIRE_VENV")


def dry_run(script: str, env: dict, *args: str, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("SLURM_")}
    full.update({"DRY_RUN": "1", "THINWIRE_VENV": "/nonexistent-venv", **env})  # no venv found: plain python
    if path_prefix:
        full["PATH"] = path_prefix + os.pathsep + full.get("PATH", "")
    return subprocess.run(["bash", os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=full, timeout=30)


def command(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def assert_trainer_tail(argv: list[str]) -> None:
    i = argv.index("thinwire.train")
    assert argv[i - 1] == "-m" and argv[i + 1:] == OVERRIDES


def test_torchrun_single_node():
    argv = command(dry_run("launch/torchrun.sh", {"NPROC": "4", "PYTHON": "/opt/py"}, *OVERRIDES))
    assert argv[:3] == ["/opt/py", "-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc_per_node=4" in argv
    assert_trainer_tail(argv)


def test_torchrun_no_run_dir_added():
    argv = command(dry_run("launch/torchrun.sh", {"NPROC": "2", "TORCHRUN_ARGS": "--max-restarts=3"}))
    assert argv[0] == "python" and "--max-restarts=3" in argv
    assert argv[-2:] == ["-m", "thinwire.train"]
    assert not any(a.startswith("hydra.run.dir") for a in argv)


def test_default_python_is_the_venvs(tmp_path):
    """After the quickstart (launch/setup_env.sh made .venv) the scripts start torchrun with the
    venv's python, not a system python without torch; an activated venv wins."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    argv = command(dry_run("launch/torchrun.sh", {"NPROC": "2", "THINWIRE_VENV": str(venv)}))
    assert argv[0] == str(venv / "bin" / "python")
    env = {"NNODES": "2", "MASTER_ADDR": "h", "RDZV_ID": "j", "THINWIRE_VENV": "/nonexistent",
           "VIRTUAL_ENV": str(venv)}
    assert command(dry_run("launch/multinode.sh", env))[0] == str(venv / "bin" / "python")


def test_multinode():
    env = {"NNODES": "2", "NPROC": "4", "MASTER_ADDR": "host", "MASTER_PORT": "port", "RDZV_ID": "job42"}
    argv = command(dry_run("launch/multinode.sh", env, *OVERRIDES))
    for flag in ("--nproc_per_node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=host:port",
                 "--rdzv-id=job42"):
        assert flag in argv
    assert not any(a.startswith("--rdzv-conf") for a in argv)
    assert_trainer_tail(argv)


def test_multinode_node_rank_and_errors():
    env = {"NNODES": "2", "NPROC": "4", "MASTER_ADDR": "host", "NODE_RANK": "0"}
    argv = command(dry_run("launch/multinode.sh", env))
    assert "--rdzv-endpoint=host:29500" in argv and "--rdzv-conf=is_host=true" in argv
    assert "--rdzv-id=thinwire-host-29500" in argv
    argv = command(dry_run("launch/multinode.sh", {**env, "NODE_RANK": "1", "RDZV_ID": "j"}))
    assert "--rdzv-conf=is_host=false" in argv and "--rdzv-id=j" in argv
    for missing in ("NNODES", "MASTER_ADDR", "NODE_RANK"):
        proc = dry_run("launch/multinode.sh", {k: v for k, v in env.items() if k != missing})
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "multinode.sh: error:" in proc.stderr


def test_slurm_template(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                        'echo "$3" > "$(dirname "$0")/asked"\nprintf "gpu-node17\\ngpu-node18\\n"\n')
    scontrol.chmod(0o755)
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node[17-18]", "SLURM_JOB_ID": "777",
           "SLURM_GPUS_ON_NODE": "4"}
    argv = command(dry_run("launch/slurm.sbatch", env, *OVERRIDES, path_prefix=str(fake)))
    assert (fake / "asked").read_text().strip() == "gpu-node[17-18]"
    assert argv[0] == "srun" and "--ntasks-per-node=1" in argv and "--nodes=2" in argv
    t = argv.index("torch.distributed.run")
    assert argv[t - 2:t] == ["python", "-m"]
    for flag in ("--nproc_per_node=4", "--nnodes=2", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu-node17:29500", "--rdzv-id=777"):
        assert flag in argv[t:]
    assert_trainer_tail(argv)


def test_slurm_outside_allocation():
    proc = dry_run("launch/slurm.sbatch", {})
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST" in proc.stderr


def test_common_is_shared():
    """torchrun.sh and multinode.sh take DRY_RUN and the NPROC default from launch/_common.sh."""
    for script in ("launch/torchrun.sh", "launch/multinode.sh"):
        text = open(os.path.join(REPO, script)).read()
        assert "_common.sh" in text and "run_or_print" in text and "printf '%q '" not in text


def test_sbatch_directives():
    text = open(os.path.join(REPO, "launch/slurm.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "--shell=bash", "--external-sources", *SCRIPTS, "launch/_common.sh"],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def listening_addresses(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                    found.append(addr)
    return found


def test_rendezvous_store_listens_on_master_addr_only():
    """The launcher's rendezvous store binds dist.master_addr, not every interface, and torch's
    c10d rendezvous (a multi-tenant TCPStore on the same port) uses it."""
    import datetime

    import torch.distributed as dist

    from thinwire.trainer.world import host_rendezvous_store

    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp")
    store, port = host_rendezvous_store("127.0.0.1")
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and nothing on 0.0.0.0 / ::
    # what torch's c10d rendezvous backend creates for rdzv_endpoint=127.0.0.1:<port>
    rdzv = dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True,
                         timeout=datetime.timedelta(seconds=10))
    rdzv.set("key", "value")
    assert store.get("key") == b"value" and listening_addresses(port) == ["0100007F"]
    # the unpatched store, for contrast: torch binds every interface
    plain = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert listening_addresses(plain.port) in (["00000000"], ["00000000000000000000000000000000"])
