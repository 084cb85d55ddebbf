"""``thinwire-train`` / ``python -m thinwire.train``: compose, validate, then run.

Under torchrun (RANK and WORLD_SIZE set) this process is one worker. Run alone, it
starts ``dist.nproc`` local workers itself through torch's elastic launcher (the
engine behind torchrun) on 127.0.0.1 and a free port; they receive the resolved
config and do not compose again.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import traceback

USAGE = """usage: thinwire-train [--multirun] [--cfg job] [hydra overrides ...]   e.g. comm=topk comm.ratio=0.01 dist.nproc=2
Runs under torchrun, or starts dist.nproc local workers itself. --multirun sweeps comma-separated
values (comm=topk,int8 sync.local_steps=4,8), one run dir per combination. --cfg job (or -c job)
prints the composed, validated config of every run and exits without training. See README.md."""


def fail(msg: str) -> None:
    print(f"thinwire-train: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def worker(cfg_yamls: list[str], trainer_cls=None) -> None:
    """Entry point of every rank (self-started or torchrun): one run, or a sweep's runs in
    sequence on one process group. ``trainer_cls``: (cfg, world) -> the trainer (an elastic
    slot's, ``slot_main``); default ``thinwire.trainer.loop.Trainer``."""
    from .trainer.agreement import ConfigMismatchError
    from .trainer.checkpoint import CheckpointWriteError
    from .trainer.drift import ReplicaDriftError
    from .trainer.faults import InjectedFault
    from .config import ConfigError, from_yaml
    from .trainer.loop import NonFiniteError, train
    from .trainer.world import init_world, shutdown

    cfgs = [from_yaml(y) for y in cfg_yamls]
    cfg = cfgs[0]
    world = init_world(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.threads)
    try:
        for cfg in cfgs:
            if train(cfg, world, trainer_cls).get("stopped_by") == "Ctrl-C":  # checkpointed on every rank, said by rank 0
                os._exit(130)  # a sweep's later runs are not started
    except ConfigError as e:  # a run dir or resume the run cannot use: nothing was written
        fail_config(world.rank, e)
    except (NonFiniteError, ConfigMismatchError, ReplicaDriftError) as e:
        fail_worker(world.rank, str(e), code=getattr(e, "exit_code", 1))  # elastic: LiveDriftError's status
    except KeyboardInterrupt:  # a second Ctrl-C, or one where the ranks cannot stop together (progress.StopRequest)
        if world.rank == 0:
            from .trainer.progress import say_stopped
            from .trainer.rundir import step_dirs

            newest = step_dirs(cfg.run_dir)
            say_stopped(cfg.run_dir, None, "Ctrl-C", newest[-1] if newest else None)
        os._exit(130)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, RuntimeError) and is_comm_failure(e):  # gloo/NCCL: a peer died, hung or closed the link
            fail_worker(world.rank, f"a collective failed or timed out (dist.timeout_s={cfg.dist.timeout_s:g}): "
                                    f"{first_line(e)}", code=PEER_FAILED)
        # anything else is this rank's own error: said here, named by rank, before any teardown
        # (a traceback printed at exit comes after destroy_process_group, by which time the
        # launcher has stopped this rank for its peers' "Connection closed by peer")
        if not isinstance(e, (InjectedFault, CheckpointWriteError)):  # those say all there is
            traceback.print_exc()
        fail_worker(world.rank, f"{e.__class__.__name__}: {first_line(e)}")
    finally:
        shutdown()


def first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)[:300]


def is_comm_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("timed out", "timeout", "connection", "peer", "gloo", "nccl", "socket"))


def fail_config(rank: int, e: Exception) -> None:
    """A config error found by the workers, exit status 2. An error every rank agreed on
    (the run dir's lock, the resume checks) is printed once, by rank 0."""
    if rank == 0 or not getattr(e, "agreed", False):
        prefix = "thinwire-train" if getattr(e, "agreed", False) else f"thinwire: rank {rank}"
        print(f"{prefix}: error: {e}", file=sys.stderr, flush=True)
    os._exit(2)


PEER_FAILED = 3  # exit status of a rank whose collective failed because a peer did (not its own error)
# torch's launcher reports the first exit it sees; a rank that lost its peer waits this long
# before exiting, so the launcher names the rank that failed on its own
PEER_GRACE_S = 2.0


def fail_worker(rank: int, msg: str, code: int = 1) -> None:
    print(f"thinwire: rank {rank}: error: {msg}", file=sys.stderr, flush=True)
    if code == PEER_FAILED:  # let the launcher see the rank that failed first exit first
        time.sleep(PEER_GRACE_S)
    os._exit(code)  # do not wait on process-group teardown with a dead or hung peer


# Ctrl-C: how long the launcher waits for the workers to finish their step and write its
# checkpoint (progress.StopRequest) before it kills them (torch's default: 30 s)
SHUTDOWN_TIMEOUT_S = 120


def shutdown_timeout(launch_config) -> dict:
    """``shutdown_timeout`` where this torch's LaunchConfig has it (newer than 2.11): torch is
    unpinned above 2.1 (pyproject), and older launchers use their own grace period."""
    fields = getattr(launch_config, "__dataclass_fields__", {})
    return {"shutdown_timeout": SHUTDOWN_TIMEOUT_S} if "shutdown_timeout" in fields else {}


def launch_local(cfg, cfg_yamls: list[str]) -> int:
    """Start ``dist.nproc`` workers like ``torchrun --standalone`` would."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .trainer.world import host_rendezvous_store

    if "LOGLEVEL" not in os.environ:  # torch's own knob for these logs: set it to see them again
        # the launcher logs a failed worker's exit as a traceback of its own monitoring loop;
        # the worker printed its error in one line and the summary below names it
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    n = cfg.dist.nproc
    threads = cfg.dist.threads or max(1, (os.cpu_count() or 1) // n)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # inherited by workers: no oversubscription
    store, port = host_rendezvous_store(cfg.dist.master_addr)  # on master_addr only, not on *:port
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=os.path.basename(cfg.run_dir),
                      rdzv_backend="c10d", rdzv_endpoint=f"{cfg.dist.master_addr}:{port}",
                      rdzv_configs={"is_host": True}, max_restarts=cfg.dist.max_restarts, monitor_interval=0.1,
                      start_method="spawn", **shutdown_timeout(LaunchConfig))
    try:
        elastic_launch(lc, worker)(cfg_yamls)
    except ChildFailedError as e:
        if any(f.exitcode == 2 for f in e.failures.values()):
            return 2  # a config error found by the workers, which printed it (one line)
        if all(f.exitcode == 130 for f in e.failures.values()):
            return 130  # Ctrl-C: rank 0 said where the run stopped and how to continue it
        # the rank that failed on its own, not one that failed because it lost a peer
        own = [(r, f) for r, f in sorted(e.failures.items()) if f.exitcode != PEER_FAILED]
        rank, first = (own or sorted(e.failures.items()))[0]
        why = (f"killed by signal {-first.exitcode}" if first.exitcode < 0 else
               f"lost its connection to a peer; the rank that failed first said why above" if not own else
               f"exit code {first.exitcode}; its error is the line 'thinwire: rank {rank}: error: ...' above")
        print(f"thinwire-train: a worker failed (rank {rank}, {why})", file=sys.stderr, flush=True)
        return 1
    except SignalException:  # Ctrl-C: the agent passes it on to the workers, which stop themselves and
        return 130           # rank 0 says where the run stopped and how to continue it
    finally:
        del store
    return 0


def record_job(cfg, job: list[str]) -> None:
    """``<run dir>/.hydra/overrides.yaml`` (the run's overrides, as Hydra records them, which
    ``thinwire-report`` shows to tell the runs of a sweep apart) and ``.hydra/config.yaml``."""
    from omegaconf import OmegaConf

    from .config import to_yaml
    from .config.sweep import user_overrides

    d = os.path.join(cfg.run_dir, ".hydra")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "overrides.yaml"), "w") as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.create(user_overrides(job))))
    with open(os.path.join(d, "config.yaml"), "w") as fh:
        fh.write(to_yaml(cfg))


def take_cfg_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Hydra's ``--cfg job`` / ``-c job`` (``all`` and ``hydra`` print the same: the run's
    config; thinwire drops Hydra's own node): the overrides without it, and whether it was given."""
    out, show, i = [], False, 0
    while i < len(argv):
        a = argv[i]
        if a in ("--cfg", "-c"):
            if i + 1 >= len(argv) or argv[i + 1] not in ("job", "all", "hydra"):
                fail(f"{a}: expected job, all or hydra after it (e.g. --cfg job)")
            show, i = True, i + 2
            continue
        if a.startswith("--cfg="):
            show, i = True, i + 1
            continue
        out.append(a)
        i += 1
    return out, show


def slot_main(argv: list[str]) -> int:
    """``thinwire-train --slot S --lighthouse HOST:PORT [--host ADDR] <overrides>``: slot S of an
    ``elastic=torchft`` run as a process of its own (a world of size 1), as the elastic launcher
    (``thinwire.elastic.launch.launch_trainer``) or one ``torchrun --max-restarts`` per slot starts
    it; ``--host``: the address it advertises (default ``dist.master_addr``). docs/elastic.md."""
    import argparse

    ap = argparse.ArgumentParser(prog="thinwire-train --slot")
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--lighthouse", required=True, help="host:port of torchft_lighthouse")
    ap.add_argument("--host", default=None, help="the address this slot advertises (default: dist.master_addr)")
    a, overrides = ap.parse_known_args(argv)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):  # torchrun's: a world of 1
        os.environ.pop(k, None)
    from omegaconf import open_dict

    from .config import ConfigError, compose, to_yaml, validate
    from .elastic.membership import TorchftMembership
    from .trainer.elastic_slot import SlotTrainer, slot_dir

    try:
        cfg = compose(overrides)
        validate(cfg)
    except ConfigError as e:
        print(f"thinwire: slot {a.slot}: error: {e}", file=sys.stderr, flush=True)
        return 2
    run_dir, el = cfg.run_dir, cfg.elastic
    os.makedirs(os.path.join(run_dir, "elastic"), exist_ok=True)
    with open_dict(cfg):
        cfg.run_dir = slot_dir(run_dir, a.slot)
        cfg.dist.threads = cfg.dist.threads or max(1, (os.cpu_count() or 1) // cfg.dist.nproc)
    os.makedirs(cfg.run_dir, exist_ok=True)

    def membership():  # started once the slot's trainer is built (SlotTrainer)
        return TorchftMembership(a.slot, a.lighthouse, host=a.host or cfg.dist.master_addr,
                                 min_replicas=el.min_replicas, timeout_s=el.timeout_s,
                                 quorum_timeout_s=el.quorum_timeout_s, heartbeat_ms=el.heartbeat_ms)

    worker([to_yaml(cfg)], trainer_cls=lambda c, w: SlotTrainer(c, w, slot=a.slot, run_dir=run_dir,
                                                                 membership=membership))
    # everything is written (metrics, tape, checkpoints are synchronous): exit now, because the
    # interpreter's teardown of torchft's Manager and process group took ~7 s a slot (measured at
    # load average ~10), which every run, test and drill paid at its end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--slot"] or any(a.startswith("--slot=") for a in argv[:1]):  # an elastic slot
        return slot_main(argv)
    # the deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from .config import ConfigError, compose, to_yaml
    from .config import expand_sweep
    from .config import validate

    os.environ["THINWIRE_COMMAND"] = shlex.join(["thinwire-train", *argv])  # for the resume hint
    multirun = any(a in ("-m", "--multirun") for a in argv)
    argv = [a for a in argv if a not in ("-m", "--multirun")]
    argv, show = take_cfg_flag(argv)
    from .config import fast

    try:
        jobs = expand_sweep(argv) if multirun else [argv]
        if fast.enabled():
            fast.refuse(jobs)  # a bad config refused before torch is imported, where it can be
        cfgs = [compose(job) for job in jobs]
        for cfg in cfgs:
            validate(cfg)
    except ConfigError as e:
        fast.remember()
        fail(str(e))
    fast.remember()
    if show:  # Hydra's --cfg job: the config each run would get, nothing started or written
        for n, cfg in enumerate(cfgs):
            print(f"# run {n}: {cfg.run_dir}" if len(cfgs) > 1 else f"# {cfg.run_dir}")
            print(to_yaml(cfg), end="")
        return 0
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not torchrun or os.environ["RANK"] == "0":  # every torchrun rank runs this; one says it
        from .config.rules import advice
        for line in dict.fromkeys(a for cfg in cfgs for a in advice(cfg)):
            print(f"thinwire-train: warning: {line}", file=sys.stderr, flush=True)
    for cfg, job in zip(cfgs, jobs):
        os.makedirs(cfg.run_dir, exist_ok=True)
        if not torchrun or os.environ["RANK"] == "0":  # first, so the user knows where to look
            print(f"thinwire: run dir {cfg.run_dir}", flush=True)
            record_job(cfg, job)
    if cfgs[0].get("elastic") is not None and cfgs[0].elastic.name != "none":  # docs/elastic.md
        if torchrun or len(cfgs) > 1:
            fail("elastic=torchft: " + ("one run at a time (no --multirun)" if len(cfgs) > 1 else
                 "under torchrun start one slot per torchrun: thinwire-train --slot S --lighthouse HOST:PORT ... "
                 "(DRY_RUN=1 thinwire-train ... prints the commands)"))
        from .elastic.launch import launch_trainer
        return launch_trainer(cfgs[0], jobs[0])
    yamls = [to_yaml(cfg) for cfg in cfgs]
    if torchrun:
        worker(yamls)
        return 0
    return launch_local(cfgs[0], yamls)


if __name__ == "__main__":
    sys.exit(main())
