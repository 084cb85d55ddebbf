"""Nothing in a run dir is lost to a rerun (issue 14 A, B, C, 11 and the resume-config check):
a rerun with trainer.resume=none is refused, trainer.overwrite=true moves the old run aside,
resume=auto over checkpoints that all fail to load is refused, a run dir has one owner (a
lock the OS releases when its holder dies), metrics.jsonl is never cut before the run starts,
a resume under a changed config is refused naming the keys, and retention keeps the newest
3 checkpoints by default. Static cases fail in the test process (compose + validate, or the
CLI's entry function); the trainer's own checks run on the pool's ranks, which return the
error they raised."""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import cli_error
from thinwire.config import ConfigError, compose, to_yaml, validate
from thinwire.trainer.loggers import MetricsFile
from thinwire.trainer.loop import TrainerConfig

TINY = ["experiment=tiny", "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.eval_every=8"]


def snapshot(run_dir):
    """Every file of the run (checkpoints, metrics) with its content hash."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for f in files:
            p = os.path.join(root, f)
            if os.path.relpath(p, run_dir).startswith(("checkpoints", "metrics.jsonl")):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, run_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh]


def ckpts(run_dir):
    return sorted(d.name for d in (run_dir / "checkpoints").iterdir())


def train_on_ranks(rank, world_size, cfg_yaml):
    """``train`` as a worker runs it (no static check first); the error it raised, as text."""
    from thinwire.config import from_yaml
    from thinwire.trainer.loop import NonFiniteError, train
    from thinwire.trainer.world import init_world

    world = init_world("gloo", 120.0, 1)
    try:
        train(from_yaml(cfg_yaml), world)
    except (ConfigError, NonFiniteError) as e:
        return f"{type(e).__name__}: {e} agreed={getattr(e, 'agreed', False)}"
    return None


def trainer_errors(pools, tmp_path, *overrides):
    cfg = compose(list(overrides))
    os.makedirs(cfg.run_dir, exist_ok=True)
    os.makedirs(tmp_path / "out", exist_ok=True)
    return pools.call(train_on_ranks, cfg.dist.nproc, tmp_path / "out", to_yaml(cfg))


def test_rerun_with_resume_none_is_refused_and_overwrite_moves_the_old_run_aside(pools, tmp_path, capsys):
    run = tmp_path / "run"
    pools.train(*TINY, f"hydra.run.dir={run}")
    assert ckpts(run) == ["step_00000004", "step_00000006", "step_00000008"]  # keep_checkpoints=3 by default
    before = snapshot(run)

    code, err = cli_error(capsys, *TINY, "trainer.max_steps=30", f"hydra.run.dir={run}")
    assert code == 2 and err.startswith("thinwire-train: error: trainer.resume=none:")
    assert f"hydra.run.dir={run}" in err and "already holds a run (3 checkpoints and metrics.jsonl)" in err
    assert "trainer.resume=auto" in err and "trainer.overwrite=true" in err
    with pytest.raises(ConfigError, match="already holds a run"):
        pools.train(*TINY, f"hydra.run.dir={run}")
    assert snapshot(run) == before  # nothing written, nothing cut

    # the same refusal from the trainer (a worker that skipped the static check): every rank, one message
    errors = trainer_errors(pools, tmp_path, *TINY, f"hydra.run.dir={run}")
    assert errors[0] == errors[1] and "RunDirError: trainer.resume=none" in errors[0] and "agreed=True" in errors[0]
    assert snapshot(run) == before

    out = pools.train(*TINY, "trainer.max_steps=4", "trainer.overwrite=true", f"hydra.run.dir={run}")
    assert "the previous run is in" in out.stdout
    (prev,) = (run / "previous").iterdir()
    assert {k: v for k, v in snapshot(prev).items()} == before  # moved as it was, not deleted
    assert steps(run) == [1, 2, 3, 4] and ckpts(run) == ["step_00000002", "step_00000004"]
    with pytest.raises(ConfigError, match="overwrite=True: starts a new run, so it needs resume=none"):
        compose_validate(*TINY, "trainer.overwrite=true", "trainer.resume=auto", f"hydra.run.dir={run}")


def compose_validate(*overrides):
    cfg = compose(list(overrides))
    validate(cfg)
    return cfg


def test_resume_auto_over_unloadable_checkpoints_is_refused_and_touches_nothing(pools, tmp_path):
    run = tmp_path / "run"
    pools.train(*TINY, "trainer.max_steps=4", f"hydra.run.dir={run}")
    # every rank-1 shard damaged: the static check (common file, manifests) passes, the ranks refuse
    for d in ("step_00000002", "step_00000004"):
        (run / "checkpoints" / d / "rank00001.pt").write_bytes(b"truncated")
    before = snapshot(run)
    errors = trainer_errors(pools, tmp_path, *TINY, "trainer.resume=auto", f"hydra.run.dir={run}")
    assert errors[0] == errors[1], errors
    msg = errors[0]
    assert msg.startswith(f"RunDirError: trainer.resume=auto: no checkpoint in {run}/checkpoints can be loaded")
    assert "step_00000004: rank00001.pt is unreadable" in msg and "step_00000002: rank00001.pt" in msg
    assert "not starting over from step 0" in msg and "\n" not in msg
    assert snapshot(run) == before

    # every common file damaged: refused before any process starts
    for d in ("step_00000002", "step_00000004"):
        (run / "checkpoints" / d / "common.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as exc:
        pools.train(*TINY, "trainer.resume=auto", f"hydra.run.dir={run}")
    assert f"no checkpoint in {run}/checkpoints can be loaded (step_00000004: common.pt is unreadable" in str(exc.value)


def test_a_run_dir_has_one_owner_and_a_dead_owner_releases_it(pools, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job holds the run dir
    os.write(fd, b"pid 4242 on elsewhere\n")
    try:
        code, err = cli_error(capsys, *TINY, "trainer.resume=auto", f"hydra.run.dir={run}")
        assert code == 2 and f"hydra.run.dir={run}: the run dir is in use by another job (pid 4242 on elsewhere)" in err
        # a job that got past the launcher's check: rank 0 cannot take the lock, every rank stops
        errors = trainer_errors(pools, tmp_path, *TINY, "trainer.resume=auto", f"hydra.run.dir={run}")
        assert errors[0] == errors[1] and "in use by another job" in errors[0]
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        os.close(fd)

    # a holder killed with SIGKILL: the kernel drops its lock, the next owner takes it
    from thinwire.trainer.rundir import RunDirError, RunDirLock

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by another job"):
            RunDirLock(str(run))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunDirLock(str(run))
    assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_metrics_are_not_cut_before_the_run_writes_its_first_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 9, "lo')  # torn by a crash
    m = MetricsFile(str(tmp_path), resume_step=4)  # a resumed run that then fails before its first step
    m.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines) + '{"step": 9, "lo'
    m = MetricsFile(str(tmp_path), resume_step=8)
    m.log({"step": 9, "loss": 0.5})
    m.close()
    assert steps(tmp_path) == list(range(1, 10))


def test_resume_under_a_changed_config_is_refused_naming_the_keys(pools, tmp_path, capsys):
    run = tmp_path / "run"
    topk = ["comm=topk", "comm.ratio=0.05", "comm.min_numel=256"]
    pools.train(*TINY, *topk, "trainer.stop_after=4", f"hydra.run.dir={run}")
    before = snapshot(run)

    code, err = cli_error(capsys, *TINY, "comm=int8", "optim.lr=0.002", "trainer.seed=3", "trainer.resume=auto",
                          f"hydra.run.dir={run}")
    assert code == 2
    assert (f"trainer.resume=auto: the checkpoint {run}/checkpoints/step_00000004 was written with a different "
            f"config: ") in err
    assert err.endswith("config: comm.name (topk -> int8), optim.lr (0.003 -> 0.002), trainer.seed (0 -> 3); resume "
                        "with the checkpoint's values (only trainer.max_steps, eval/checkpoint/log cadence, logger, "
                        "dist.* and the like may change), or start a new run in another hydra.run.dir"), err
    # the trainer's own check, before any state is loaded: every rank, the same line
    errors = trainer_errors(pools, tmp_path, *TINY, *topk, "model.n_embd=32", "trainer.resume=auto",
                            f"hydra.run.dir={run}")
    assert errors[0] == errors[1] and "ResumeConfigError" in errors[0] and "model.n_embd (64 -> 32)" in errors[0]
    assert snapshot(run) == before

    # safe changes: length, cadence, logging, launch
    out = pools.train(*TINY, *topk, "trainer.max_steps=10", "trainer.eval_every=5", "trainer.log_every=1",
                      "trainer.checkpoint_every=5", "trainer.keep_checkpoints=0", "logger=none",
                      "dist.timeout_s=60", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert steps(run) == list(range(1, 11))


def test_config_changes_ignore_only_the_documented_safe_keys():
    from thinwire.config.resume import SAFE_TO_CHANGE, config_changes

    a = compose(["experiment=tiny", "hydra.run.dir=/tmp/a"])
    b = compose(["experiment=tiny", "hydra.run.dir=/tmp/b", "trainer.max_steps=99", "trainer.stop_after=5",
                 "trainer.resume=auto", "logger=none", "dist.nproc=1", "trainer.keep_checkpoints=0"])
    assert config_changes(a, b) == []
    c = compose(["experiment=tiny", "trainer.seed=1", "data.batch_size=4", "peft=lora", "sync=local"])
    keys = {k for k, _, _ in config_changes(a, c)}
    assert {"trainer.seed", "data.batch_size", "peft.name", "sync.name"} <= keys
    assert "trainer.max_steps" in SAFE_TO_CHANGE and "trainer.seed" not in SAFE_TO_CHANGE
    assert config_changes(to_yaml(a), a) == []  # the YAML a checkpoint holds compares equal


def test_keep_checkpoints_defaults_to_the_newest_three():
    assert TrainerConfig().keep_checkpoints == 3
    assert compose(["experiment=tiny"]).trainer.keep_checkpoints == 3
