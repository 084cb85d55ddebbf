"""Long-lived ranks for tests: one gloo group serves many multi-rank checks and training runs.

Starting ranks is the expensive part of a multi-rank test on a small machine: a spawned
interpreter imports torch and thinwire (seconds each, ranks competing for the same cores),
and a CLI launch adds another interpreter and torch's elastic launcher before the first
step. A ``RankPool`` starts ``world_size`` spawned ranks once, joined in one gloo group
through ``thinwire.trainer.world.init_world`` (the workers' own code path), and then serves
jobs in order:

- ``call``: a module-level function ``fn(rank, world_size, *args)``, on every rank, its
  result saved per rank (what ``conftest.run_ranks`` returns);
- ``train``: a resolved config, on which every rank calls ``thinwire.trainer.loop.train``,
  the path ``thinwire-train --multirun`` takes for a sweep's runs on one process group.
  The test composes and validates in its own process, as the CLI does before it launches.

What needs a real process stays a CLI test (``conftest.run_cli``, marked ``slow``): the
launchers, restarts after SIGKILL, hung peers, the exit status and stderr of a failure, and
entry points (read once per process). A job that raises on any rank fails the test with the
rank's traceback and retires the group: after an error the ranks may disagree on the next
collective. Pools of different sizes live side by side; idle ranks block on a queue.
"""
from __future__ import annotations

import contextlib
import io
import os
import queue
import traceback
from dataclasses import dataclass

import torch.multiprocessing as mp

JOB_TIMEOUT_S = 300


@dataclass
class Run:
    record: dict  # the run's last metrics row, as ``train`` returns it
    stdout: str   # what the rank printed
    stderr: str   # its warnings


class JobFailed(RuntimeError):
    """A job raised (or hung) on some rank; the message holds the rank's traceback."""


def _do(job, world):
    kind = job[0]
    if kind == "train":
        from thinwire.config import from_yaml
        from thinwire.trainer.loop import train

        out, err = io.StringIO(), io.StringIO()
        here = os.getcwd()
        os.chdir(job[2])  # the test's working directory, as a CLI launched from there would have
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                record = train(from_yaml(job[1]), world)
        finally:
            os.chdir(here)
        return Run(record, out.getvalue(), err.getvalue())
    import torch

    _, fn, args, out_file = job
    torch.save(fn(world.rank, world.world_size, *args), out_file)
    return None


def _serve(rank: int, world_size: int, port: int, jobs, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WANDB_MODE="disabled")
    from thinwire.trainer.world import init_world

    world = init_world("gloo", timeout_s=120.0, threads=1)
    while True:
        job = jobs.get()
        if job is None:
            break
        try:
            results.put((rank, _do(job, world), None))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails
            results.put((rank, None, traceback.format_exc()))
            break
    # the queue's feeder thread must deliver the last result before os._exit (else the test
    # waits out JOB_TIMEOUT_S for a traceback that was never sent)
    results.close()
    results.join_thread()
    # leave without gloo's teardown: see conftest.leave
    os._exit(0)


class RankPool:
    def __init__(self, world_size: int):
        from thinwire.trainer.world import free_port

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.jobs[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.alive = True

    def submit(self, jobs: list[tuple], timeout: float = JOB_TIMEOUT_S) -> list:
        """Run ``jobs[r]`` on rank ``r``; each rank's return value."""
        for q, job in zip(self.jobs, jobs):
            q.put(job)
        values, error = [None] * self.world_size, None
        try:
            for _ in range(self.world_size):
                rank, value, error = self.results.get(timeout=timeout)
                values[rank] = value
                if error:
                    error = f"rank {rank}:\n{error}"
                    break  # the other ranks may wait in a collective for this one
        except queue.Empty:
            error = f"no result within {timeout:g} s (a hang)"
        if error:
            self.close()
            raise JobFailed(error)
        return values

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


class Pools:
    """One live pool per world size, started on first use and after a failure."""

    def __init__(self):
        self.pools: dict[int, RankPool] = {}

    def get(self, world_size: int) -> RankPool:
        pool = self.pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self.pools[world_size] = RankPool(world_size)
        return pool

    def call(self, fn, world_size: int, out_dir, *args, timeout: float = JOB_TIMEOUT_S) -> list:
        """``fn(rank, world_size, *args)`` on every rank of a pool; each rank's result."""
        import torch

        files = [os.path.join(str(out_dir), f"rank{r}.pt") for r in range(world_size)]
        for f in files:
            if os.path.exists(f):
                os.remove(f)
        self.get(world_size).submit([("call", fn, args, f) for f in files], timeout)
        return [torch.load(f, weights_only=False) for f in files]

    def train(self, *overrides: str, timeout: float = JOB_TIMEOUT_S) -> Run:
        """Compose and validate ``overrides`` as ``thinwire-train`` would, then run them on a
        pool of ``dist.nproc`` ranks; rank 0's record and output."""
        return self.train_all(*overrides, timeout=timeout)[0]

    def train_all(self, *overrides: str, timeout: float = JOB_TIMEOUT_S) -> list[Run]:
        """:meth:`train`, every rank's record and output."""
        from thinwire.config import compose, to_yaml, validate

        cfg = compose(list(overrides))
        validate(cfg)
        os.makedirs(cfg.run_dir, exist_ok=True)
        job = ("train", to_yaml(cfg), os.getcwd())
        return self.get(cfg.dist.nproc).submit([job] * cfg.dist.nproc, timeout)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


POOLS = Pools()  # the session's; conftest closes it at the end

