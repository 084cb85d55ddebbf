"""A replica simulator for one device: ``bench/quality.py --simulate`` runs the p ranks of a run
as p threads of ONE process, taking turns, with the collectives replaced by in-process math.

Each thread is one rank running thinwire's own ``Trainer`` unchanged (``thinwire.trainer.loop.train``):
its model copy, inner optimizer, data shard (``data.train_batch(step)`` of its rank), optimizer
plugin, DDP engine and comm hook or outer strategy (``OuterStrategy``, ``Round``, the compressors,
error feedback and ``CompressedAverager``). Only the process group differs: ``SimGroup``, a
``torch.distributed.ProcessGroup`` registered as backend ``thinwire_sim``, whose collectives
wait until every member rank has called them, then compute the result from the members' tensors
in this process. The per-thread default group is torch's thread-local world
(``torch.testing._internal.distributed.multi_threaded_pg``, the mechanism of torch's own
multi-threaded tests); the reduction and the turn-taking are this module's.

Determinism: exactly one rank runs at a time (``Baton``). A rank hands the baton on only when it
must wait for a collective the others have not reached; the next rank that can run is chosen in
rank order, so the interleaving depends on the program alone. The global RNG (``torch.manual_seed``
in the trainer, dropout) is saved and restored at every hand-over, so each rank sees the stream it
would have in its own process. Sums add in the order of gloo's ring all-reduce (``ring_sum``), so
a simulated run is bitwise the real one when the intra-op thread count is a real rank's too.

Refused with one line (``refusal``): ``sync=co2`` (CO2's stale rounds and eager updates: means in
flight across steps, whose overlap and wait times the simulator cannot reproduce, as it completes
every collective when the last rank joins), and the optimizers that exchange inside the step
(``optim=demo|distro``, ``optim=adam1bit``), which have not been checked against the real path;
so are engines other than DDP (ZeRO, FSDP2).
Speed: the ranks share one process's intra-op threads (``--sim-threads``; by default a real
rank's count, so that kernels sum in the same order) instead of one process and a gloo link each.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions, AllreduceOptions, AllToAllOptions, BroadcastOptions, \
    _create_work_from_future

BACKEND = "thinwire_sim"
UNCHECKED = "not checked against the real path (the simulator's checks: dense, local, DiLoCo, SparseLoCo, streaming)"
REFUSED = {("sync", "co2"): "its means are in flight across steps, and the simulator completes every collective "
           "when the last rank joins, so overlap and wait times mean nothing; " + UNCHECKED,
           ("optim", "demo"): UNCHECKED, ("optim", "distro"): UNCHECKED, ("optim", "adam1bit"): UNCHECKED}


def refusal(cfg) -> Optional[str]:
    """One line saying why the simulator cannot model ``cfg`` (None: it can)."""
    for (group, name), why in REFUSED.items():
        if cfg[group].name == name:
            return f"--simulate: {group}={name} is refused: {why}; run it without --simulate"
    if cfg.engine.name != "ddp":
        return f"--simulate: engine={cfg.engine.name} is not modelled (only engine=ddp); run it without --simulate"
    return None


class Deadlock(RuntimeError):
    pass


class Baton:
    """Exactly one of p rank threads runs at a time. ``wait_until(rank, ready)``: hand the baton
    to the next rank (in rank order after ``rank``) that can run, and sleep until this rank holds
    it again with ``ready()`` true. The global RNG state travels with the rank."""

    def __init__(self, p: int):
        self.p, self.turn, self.cond = p, 0, threading.Condition()
        self.ready = [lambda: True] * p      # what each rank is waiting for
        self.finished = [False] * p
        self.rng = [None] * p
        self.error: Optional[BaseException] = None

    def _next(self, rank: int) -> Optional[int]:
        for k in range(1, self.p + 1):
            r = (rank + k) % self.p
            if not self.finished[r] and self.ready[r]():
                return r
        return None

    def _hand_over(self, rank: int) -> None:
        self.rng[rank] = torch.get_rng_state()
        nxt = self._next(rank)
        if nxt is None and not all(self.finished):
            self.error = self.error or Deadlock("every rank waits on a collective that another has not reached")
        self.turn = nxt
        self.cond.notify_all()

    def _resume(self, rank: int) -> None:
        if self.error is not None:
            raise RuntimeError(f"rank {rank}: stopped because another rank failed: {self.error}")
        if self.rng[rank] is not None:
            torch.set_rng_state(self.rng[rank])

    def start(self, rank: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == rank or self.error is not None)
            self._resume(rank)

    def wait_until(self, rank: int, ready) -> None:
        with self.cond:
            if ready():
                return
            self.ready[rank] = ready
            self._hand_over(rank)
            self.cond.wait_for(lambda: self.turn == rank or self.error is not None)
            self.ready[rank] = lambda: True
            self._resume(rank)

    def finish(self, rank: int, error: Optional[BaseException] = None) -> None:
        with self.cond:
            self.finished[rank] = True
            if error is not None and self.error is None:
                self.error = error
            if self.turn == rank:
                self._hand_over(rank)
            else:
                self.cond.notify_all()


def ring_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the ranks' tensors, added in the order gloo's ring all-reduce adds them, so
    that it is bitwise gloo's: the flat buffer is cut into 2p segments of ceil(bytes / 2p)
    bytes (whole elements), rank c's chunk being segments 2c and 2c+1, and chunk c is
    accumulated around the ring from rank c-1 backwards: ((x_{c-1} + x_{c-2}) + ...) + x_c.
    Measured against torch 2.13's gloo at p = 4, sizes 1,000-800,003 elements (tests/test_simulate.py
    checks it at p = 4); at p = 2 every order is the same (x + y == y + x)."""
    p, flat = len(tensors), [t.reshape(-1) for t in tensors]
    n, size = flat[0].numel(), flat[0].element_size()
    seg = -(-(-(-n * size // (2 * p))) // size)   # elements per segment
    out = torch.empty_like(flat[0])
    for c in range(p):
        lo, hi = min(n, 2 * seg * c), min(n, 2 * seg * (c + 1))
        order = [(c - 1 - k) % p for k in range(p)]
        acc = flat[order[0]][lo:hi].clone()
        for r in order[1:]:
            acc.add_(flat[r][lo:hi])
        out[lo:hi] = acc
    return out.view_as(tensors[0])


REDUCE = {dist.ReduceOp.SUM: ring_sum,
          dist.ReduceOp.MAX: lambda ts: torch.stack(ts).amax(0),
          dist.ReduceOp.MIN: lambda ts: torch.stack(ts).amin(0)}


class Collective:
    """One collective call of a group: every member's arguments, then ``work`` once."""

    def __init__(self, size: int, work):
        self.args, self.work, self.done = [None] * size, work, False

    @torch.no_grad()
    def join(self, rank: int, args) -> None:
        self.args[rank] = args
        if all(a is not None for a in self.args):
            self.work(self.args)
            self.done = True


def _done_work(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return _create_work_from_future(fut)


class Simulation:
    """What the rank threads share: the baton and each group's collectives in flight, keyed by
    (group name, the group's call number)."""

    def __init__(self, p: int):
        self.baton, self.calls, self.lock = Baton(p), {}, threading.Lock()
        self.local = threading.local()   # .rank: this thread's global rank
        self.registered: list[str] = []  # the groups' names in torch's process-wide registry


SIM: list[Simulation] = []   # the running simulation (one at a time per process)


class SimGroup(dist.ProcessGroup):
    """A process group of rank threads (module doc): every collective completes when the last
    member joins; the members that joined before it wait on the baton."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self._rank, self._size, self._calls = rank, size, 0
        self._sim = SIM[-1]
        self._world = dist.distributed_c10d._world._get_world()

    def size(self):
        return self._size

    def getBackendName(self):
        return BACKEND

    def _run(self, work, args, result):
        sim = self._sim
        key = (self._world.pg_names[self], self._calls)
        self._calls += 1
        with sim.lock:
            coll = sim.calls.setdefault(key, Collective(self._size, work))
        coll.join(self._rank, args)
        sim.baton.wait_until(sim.local.rank, lambda: coll.done)
        with sim.lock:
            if all(a is not None for a in coll.args) and key in sim.calls:
                sim.calls.pop(key)
        return _done_work(result)

    def allreduce(self, tensors, opts=AllreduceOptions()):
        reduce = REDUCE[opts.reduceOp.op if hasattr(opts.reduceOp, "op") else opts.reduceOp]

        def work(args):
            for i in range(len(args[0])):
                out = reduce([a[i] for a in args])
                for a in args:
                    a[i].copy_(out)
        return self._run(work, tensors, tensors)

    def allreduce_coalesced(self, tensors, opts=AllreduceOptions()):
        return self.allreduce(tensors, opts)

    def barrier(self, opts=None):
        return self.allreduce([torch.zeros(1)])

    def broadcast(self, tensors, opts=BroadcastOptions()):
        def work(args):
            for i in range(len(args[0])):
                for a in args:
                    a[i].copy_(args[opts.rootRank][i])
        return self._run(work, tensors, tensors)

    def allgather(self, outputs, inputs, opts=AllgatherOptions()):
        def work(args):
            for out, _ in args:
                for src, (_, inp) in enumerate(args):
                    out[0][src].copy_(inp[0])
        return self._run(work, (outputs, inputs), outputs)

    def all_gather_single(self, output, input, opts=AllgatherOptions()):
        def work(args):
            for out, _ in args:
                out.copy_(torch.cat([inp.reshape(-1) for _, inp in args]).view_as(out))
        return self._run(work, (output, input), output)

    _allgather_base = all_gather_single

    def all_to_all_single(self, output, input, output_splits, input_splits, opts=AllToAllOptions()):
        def splits(buf, sizes):
            sizes = list(sizes) if sizes is not None and len(sizes) else [buf.size(0) // self._size] * self._size
            return list(buf.split([int(s) for s in sizes]))

        def work(args):
            ins = [splits(inp, isz) for _, inp, _, isz in args]
            for dst, (out, _, osz, _) in enumerate(args):
                for src, piece in enumerate(splits(out, osz)):
                    piece.copy_(ins[src][dst])
        return self._run(work, (output, input, output_splits, input_splits), output)

    alltoall_base = all_to_all_single


def _create(prefix_store, rank, world_size, timeout):
    return SimGroup(rank, world_size)


_REGISTER = dist.distributed_c10d._register_process_group


def _register(name, pg) -> None:
    """torch's registry of groups by name is process-wide; each rank thread's groups go in under
    a name of their own (the thread-local world keeps torch's names, equal on every rank)."""
    own = f"{BACKEND}:{id(SIM[-1])}:{SIM[-1].local.rank}:{name}"
    SIM[-1].registered.append(own)
    _REGISTER(own, pg)


def _install() -> None:
    """torch.distributed per thread, for the simulation's length (``_uninstall`` restores it)."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    dist.distributed_c10d._register_process_group = _register
    from torch.testing._internal.distributed import multi_threaded_pg

    multi_threaded_pg._install_threaded_pg()


def _uninstall() -> None:
    from torch.testing._internal.distributed import multi_threaded_pg

    multi_threaded_pg._uninstall_threaded_pg()
    dist.distributed_c10d._register_process_group = _REGISTER


def rank_threads(p: int) -> int:
    """A real rank's intra-op threads (``dist.threads=0``: cores // local ranks, at least 1)."""
    return max(1, (os.cpu_count() or 1) // p)


def run(cfg, threads: int = 0) -> dict:
    """Train ``cfg`` (composed and validated, ``dist.nproc`` = p) with p rank threads in this
    process; rank 0's last record. ``threads``: torch's intra-op threads (0: ``dist.threads``, or
    a real rank's, :func:`rank_threads`; other counts change the order of sums inside kernels)."""
    from thinwire.trainer.loop import train
    from thinwire.trainer.world import World

    why = refusal(cfg)
    if why:
        raise SystemExit(why)
    if SIM:
        raise RuntimeError("one simulation at a time per process")
    p = int(cfg.dist.nproc)
    threads = threads or int(cfg.dist.threads) or rank_threads(p)
    sim = Simulation(p)
    store = dist.HashStore()
    records: list = [None] * p

    def rank_main(rank: int) -> None:
        sim.local.rank = rank
        error = None
        try:
            torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread
            sim.baton.start(rank)
            dist.init_process_group(BACKEND, rank=rank, world_size=p, store=store,
                                    timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
            async_group = dist.new_group(backend=BACKEND) if p > 1 else None
            world = World(rank, p, rank, torch.device("cpu"), BACKEND, async_group, cfg.dist.timeout_s)
            records[rank] = train(cfg, world)
        except BaseException as e:  # noqa: BLE001 - reported by run()
            error = e
        finally:
            sim.baton.finish(rank, error)
            if error is not None:
                records[rank] = error

    ts = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(p)]
    _install()
    SIM.append(sim)
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        for name in sim.registered:
            dist.distributed_c10d._unregister_process_group(name)
        SIM.remove(sim)
        _uninstall()
    errors = [r for r in records if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return records[0]


def simulate_run(ov: list[str], run_dir: str, threads: int = 0) -> float:
    """``thinwire-train`` ``ov`` (the harness's overrides) simulated in this process into
    ``run_dir`` (``metrics.jsonl`` as the real run writes it); the seconds it took."""
    from thinwire.config import compose, validate

    cfg = compose([*ov, f"hydra.run.dir={run_dir}", "trainer.overwrite=true"])
    validate(cfg)
    why = refusal(cfg)
    if why:
        raise SystemExit(why)
    t0 = time.perf_counter()
    run(cfg, threads)
    return time.perf_counter() - t0


def refusal_of(ov: list[str]) -> Optional[str]:
    """``refusal`` for a run given as overrides (composed here; nothing runs)."""
    from thinwire.config import compose

    return refusal(compose(list(ov)))


def _rows(d: str) -> list[dict]:
    from .runs import rows_of

    return rows_of(d)


def compare(real: list[dict], sim: list[dict]) -> dict:
    """The real run's metrics rows against the simulated run's: the largest |val loss
    difference| over the evaluations, whether every logged loss and val loss is bitwise equal,
    the final val losses and the seconds of training steps (sum of rank 0's ``step_time_s``)."""
    vals = [(a["val_loss"], b["val_loss"]) for a, b in zip(real, sim) if "val_loss" in a and "val_loss" in b]
    same = len(real) == len(sim) and all(a.get(k) == b.get(k) for a, b in zip(real, sim) for k in ("loss", "val_loss"))
    return {"val_real": vals[-1][0], "val_sim": vals[-1][1], "max_abs_val_diff": max(abs(a - b) for a, b in vals),
            "bitwise": same, "steps_s_real": sum(r["step_time_s"] for r in real),
            "steps_s_sim": sum(r["step_time_s"] for r in sim)}


def check(tasks: list[tuple[str, int, list[str], str]], sim_root: str, threads: int = 0) -> list[dict]:
    """For each (row, seed, overrides, real run dir): the real run (``thinwire-train``: dist.nproc
    gloo processes), then the simulated one, both run now and timed in the same invocation;
    :func:`compare`'s figures plus each one's wall-clock seconds (process start included)."""
    from . import runs

    out = []
    for row, seed, ov, real_dir in tasks:
        os.makedirs(real_dir, exist_ok=True)
        t0 = time.perf_counter()
        runs.train([*ov, "trainer.overwrite=true"], real_dir)
        real_s = time.perf_counter() - t0
        sim_dir = runs.run_dir(sim_root, ov, kind="sim")
        sim_s = simulate_run(ov, sim_dir, threads)
        res = {"row": row, "seed": seed, **compare(_rows(real_dir), _rows(sim_dir)), "wall_s_real": real_s,
               "wall_s_sim": sim_s, "load": os.getloadavg()[0], "real_dir": real_dir, "sim_dir": sim_dir}
        with open(os.path.join(sim_root, "check.jsonl"), "a") as fh:  # for --report
            fh.write(json.dumps(res) + "\n")
        print(f"  {row!r} seed {seed}: |val diff| {res['max_abs_val_diff']:.2e}, bitwise {res['bitwise']}, "
              f"real {real_s:.0f} s, sim {sim_s:.0f} s", flush=True)
        out.append(res)
    return out


def checked(tasks: list[tuple[str, int, list[str], str]], sim_root: str) -> list[dict]:
    """--report: :func:`check`'s figures from the runs already made (wall-clock seconds from the
    invocation that ran them, ``<sim_root>/check.jsonl``; None where it did not record them)."""
    from . import runs

    timed = {}
    path = os.path.join(sim_root, "check.jsonl")
    if os.path.exists(path):
        with open(path) as fh:
            timed = {r["real_dir"]: r for r in map(json.loads, fh)}
    out = []
    for row, seed, ov, real_dir in tasks:
        real, sim = _rows(real_dir), _rows(runs.run_dir(sim_root, ov, kind="sim"))
        if real and sim and real[-1]["step"] == sim[-1]["step"] and "val_loss" in real[-1]:
            t = timed.get(real_dir, {})
            out.append({"row": row, "seed": seed, **compare(real, sim), "wall_s_real": t.get("wall_s_real"),
                        "wall_s_sim": t.get("wall_s_sim"), "load": t.get("load")})
    return out


def check_table(results: list[dict], nproc: int, steps: int, threads: int) -> str:
    lines = [f"{nproc} ranks, {steps} steps: the real path ({nproc} gloo processes) vs the simulator (one process, "
             f"{threads} intra-op threads), run one after the other per row; load = 1-min load average after the row.",
             "", "| row | seed | val real | val sim | max abs val diff | every loss bitwise | wall s real / sim "
             "| wall ratio | steps s real / sim | steps ratio | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        wall = (f"{r['wall_s_real']:.0f} / {r['wall_s_sim']:.0f} | {r['wall_s_real'] / r['wall_s_sim']:.2f}"
                if r.get("wall_s_sim") else "- | -")
        lines.append(f"| {r['row']} | {r['seed']} | {r['val_real']:.6f} | {r['val_sim']:.6f} | {r['max_abs_val_diff']:.1e} "
                     f"| {'yes' if r['bitwise'] else 'no'} | {wall} | {r['steps_s_real']:.0f} / {r['steps_s_sim']:.0f} "
                     f"| {r['steps_s_real'] / r['steps_s_sim']:.2f} | {'-' if r.get('load') is None else '%.1f' % r['load']} |")
    return "\n".join(lines)
