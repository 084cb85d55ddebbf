"""torchft's DiLoCo (and Streaming DiLoCo) as the local-update peer, on the shared quality
harness's model, data, inner optimizer, LR schedule, seeds and 64 eval batches.

    python bench/torchft_peer.py --H 8 --steps 480 --out DIR -- <thinwire overrides>
    python bench/torchft_peer.py --H 8 --fragments 2 --delay 1 ...      # streaming
    python bench/torchft_peer.py --harness --H 8 --steps 160 --vs-thinwire 2 --out DIR
        # the harness's run, torchft's DiLoCo and thinwire's sync=diloco timed alternately

Runs torchft 0.2.0 unchanged (``pip install thinwire[bench]``): its bundled
``torchft_lighthouse`` on 127.0.0.1, one replica group of one process per rank (``--nproc``),
each with its own TCPStore, a torchft ``Manager`` over torchft's ``ProcessGroupGloo``
(synchronous quorum, as ``DiLoCo`` requires; ``init_sync=False``: every replica starts from
the same seeded initialisation, as thinwire's ranks do) and ``torchft.local_sgd.DiLoCo``
configured as torchft's documentation and tests do (Douillard et al. 2023, arXiv 2311.08105;
Streaming DiLoCo, arXiv 2501.18512): outer SGD, Nesterov momentum 0.9, lr 0.7, one outer
optimizer per fragment, ``sync_every=H``, ``fragment_sync_delay`` = tau,
``fragment_update_alpha`` = alpha (0: take the global parameters). No outer clip (thinwire's
rows use ``sync.clip=inf``). Quantised all-reduce is CUDA-only in torchft: fp32 here.

What is thinwire's (so both sides share it): the model and data built from the same config
(``trainer.seed`` seeds the initialisation, the data order per rank is a function of seed,
rank and step), the inner step (``AdamWPlugin.compute`` / ``apply``: AdamW with decay on
matrices, gradient clip 1.0, the LR of ``optim.schedule`` at each step, whose
``optimizer.step()`` fires torchft's hooks) and ``evaluate``'s 64 fixed batches, on replica 0
of the replicas' mean parameters (all 64 in one process; thinwire splits them across ranks
and sums: the same mean up to float order).
Fragments (streaming): thinwire's (``strided_fragments``): the GPT's blocks strided over F
fragments (block i in fragment i % F, Streaming DiLoCo's preferred pattern), the parameters
outside blocks dealt out the same way in model order.

Per-step time is measured as thinwire's ``step_time_s`` is (``Trainer.train_step``): from
before the forward to after the optimizer step and its sync, batch construction outside,
evaluation not counted; the report is replica 0's mean. Writes ``DIR/result.json``:
``val_loss``, ``step_time_s`` (mean), ``steps``, and whether the replicas hold the same model
(DiLoCo: they must after the last sync; streaming: not, see :func:`mean_model_val_loss`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

from harness import manifest
from harness.peers import fragments_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica(i: int, a, lighthouse: str, out: str) -> None:
    import torch
    from hydra.utils import instantiate
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    from thinwire.config import compose
    from thinwire.optim.plugins import AdamWPlugin

    logging.basicConfig(level=logging.WARNING)
    cfg = compose(a.overrides)
    # thinwire's rule (init_world): dist.threads, or 0 = cores / local workers
    torch.set_num_threads(cfg.dist.threads or max(1, (os.cpu_count() or 1) // a.nproc))
    seed, n = cfg.trainer.seed, a.nproc
    data = instantiate(cfg.data, seed=seed, rank=i, world_size=n)
    torch.manual_seed(seed)  # identical initial parameters on every replica (thinwire's Trainer does the same)
    model = instantiate(cfg.model, info=data.info)
    plugin = AdamWPlugin(cfg.optim, model, max_steps=cfg.trainer.max_steps)
    frags = fragments_of(model, a.fragments)
    outer = [torch.optim.SGD(f.parameters(), lr=a.outer_lr, momentum=a.outer_momentum, nesterov=True) for f in frags]
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    t = timedelta(seconds=a.timeout_s)
    manager = Manager(pg=ProcessGroupGloo(timeout=t), load_state_dict=None, state_dict=None, min_replica_size=n,
                      use_async_quorum=False, init_sync=False, replica_id=f"replica_{i}", store_addr="127.0.0.1",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=lighthouse, hostname="127.0.0.1",
                      timeout=t, quorum_timeout=t, connect_timeout=t)
    times = []
    try:
        with DiLoCo(manager, frags, plugin.optimizer, outer, sync_every=a.H, backup_device=torch.device("cpu"),
                    pin_memory=False, fragment_sync_delay=a.delay, fragment_update_alpha=a.alpha):
            for step in range(a.steps):
                batch = data.train_batch(step)
                t0 = time.perf_counter()
                plugin.compute(model, batch)
                plugin.apply(step)  # AdamW step; torchft's post-step hook syncs every H / F steps
                times.append(time.perf_counter() - t0)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        torch.save(model.state_dict(), os.path.join(out, f"replica{i}.pt"))
        with open(os.path.join(out, f"replica{i}.json"), "w") as fh:
            json.dump({"replica": i, "step_time_s": sum(times) / len(times), "steps": len(times),
                       "manager_step": manager.current_step(),
                       "checksum": [float(flat.sum()), float(flat.square().sum())]}, fh)
    finally:
        manager.shutdown(wait=False)


def mean_model_val_loss(a) -> float:
    """Val loss of the replicas' mean parameters (thinwire's ``eval_model`` under local
    updates) on all 64 fixed batches. DiLoCo's replicas agree after the last sync, so this is
    their common model; under streaming the fragments synced before the last step have moved
    on locally since, and torchft defines no final flush."""
    import torch
    from hydra.utils import instantiate

    from thinwire.comm.accounting import WireMeter
    from thinwire.config import compose
    from thinwire.trainer.loop import evaluate
    from thinwire.trainer.world import World

    states = [torch.load(os.path.join(a.out, f"replica{i}.pt")) for i in range(a.nproc)]
    cfg = compose(a.overrides)
    data = instantiate(cfg.data, seed=cfg.trainer.seed, rank=0, world_size=1)  # all 64 eval batches
    model = instantiate(cfg.model, info=data.info)
    model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    assert not torch.distributed.is_initialized()  # evaluate's all-reduce is then local
    return evaluate(model, data, World(0, 1, 0, torch.device("cpu"), "gloo"), WireMeter())


def run_torchft(a, out: str) -> dict:
    """One torchft run (lighthouse + ``--nproc`` replicas) into ``out``; its result."""
    import torch.multiprocessing as mp

    os.makedirs(out, exist_ok=True)
    a = argparse.Namespace(**{**vars(a), "out": out})
    port = free_port()
    lh = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse"),
                           "--min_replicas", str(a.nproc), "--bind", f"127.0.0.1:{port}",
                           "--quorum_tick_ms", "20", "--join_timeout_ms", "60000"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=replica, args=(i, a, f"http://127.0.0.1:{port}", out)) for i in range(a.nproc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise SystemExit(f"torchft replica(s) {failed} failed")
    finally:
        lh.terminate()
        lh.wait()
    recs = []
    for i in range(a.nproc):
        with open(os.path.join(out, f"replica{i}.json")) as fh:
            recs.append(json.load(fh))
    same = all(r["checksum"] == recs[0]["checksum"] for r in recs)
    result = {"val_loss": mean_model_val_loss(a), "step_time_s": recs[0]["step_time_s"], "steps": a.steps,
              "H": a.H, "fragments": a.fragments, "delay": a.delay, "replicas_agree": same,
              "manager_steps": [r["manager_step"] for r in recs],
              "per_replica_step_time_s": [r["step_time_s"] for r in recs]}
    with open(os.path.join(out, "result.json"), "w") as fh:  # a run's own record (compare.json: the study's)
        json.dump(result, fh, indent=1)
    if not same and a.fragments == 1:
        raise SystemExit("torchft replicas hold different models after the last sync")
    return result


def run_thinwire(a, out: str) -> dict:
    """thinwire's ``sync=diloco`` at the same H (and fragments, delay, alpha) on the same
    overrides (fresh run dir), timed as the Trainer times a step (``step_time_s`` of every
    step, rank 0)."""
    from harness.catalogue import LOCAL
    from harness.runs import launch, rows_of

    stream = [f"sync.fragments={a.fragments}", f"sync.fragment_delay={a.delay}",
              f"sync.fragment_alpha={a.alpha}"] if a.fragments > 1 else []
    ov = [*a.overrides, "sync=diloco", f"sync.local_steps={a.H}", f"sync.outer_optim.lr={a.outer_lr}", *stream, *LOCAL,
          f"trainer.eval_every={a.steps}",
          f"trainer.checkpoint_every={a.steps}", "trainer.log_every=1"]
    name = f"thinwire sync=diloco H={a.H} F={a.fragments}"
    launch(ov, out, {"row": name}, name)
    rows = rows_of(out)
    return {"val_loss": rows[-1]["val_loss"], "step_time_s": sum(r["step_time_s"] for r in rows) / len(rows),
            "steps": len(rows)}


def harness(a) -> list[str]:
    """The shared quality harness's run (``bench/time_to_target.py``'s rows, less the sync):
    model, data, AdamW at ``--lr`` with the wsd schedule over ``--steps``, seed, ranks."""
    from harness.catalogue import MODEL

    return [*MODEL, f"optim.lr={a.lr}", "optim.schedule=wsd", f"trainer.seed={a.seed}", "trainer.sample_chars=0", "trainer.progress=false", "logger=none",
            f"dist.nproc={a.nproc}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--H", type=int, default=8, help="inner steps per outer step (torchft's sync_every)")
    ap.add_argument("--fragments", type=int, default=1, help="F > 1: Streaming DiLoCo with F fragments")
    ap.add_argument("--delay", type=int, default=0, help="fragment_sync_delay (tau)")
    ap.add_argument("--alpha", type=float, default=0.0, help="fragment_update_alpha")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--harness", action="store_true",
                    help="prepend the quality harness's overrides (model, data, AdamW + wsd over --steps, --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vs-thinwire", type=int, default=0, metavar="R",
                    help="R > 0: also time thinwire's sync=diloco at the same H and fragments, R runs of each, "
                         "alternating "
                         "(thinwire first), and report the ratio of the mean step times")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="thinwire overrides (model, data, optim, trainer.seed, ...)")
    a = ap.parse_args(argv)
    if a.steps % a.H:
        raise SystemExit(f"--steps={a.steps}: must be a multiple of --H={a.H} (the run ends on a sync)")
    # --steps is the run's length and so fixes the LR schedule, on both sides
    a.overrides = [*(harness(a) if a.harness else []), *a.overrides, f"trainer.max_steps={a.steps}"]
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's per-quorum info lines
    if not a.vs_thinwire:
        print(json.dumps(run_torchft(a, a.out)))
        return 0
    runs: dict = {"thinwire": [], "torchft": []}
    for r in range(a.vs_thinwire):
        runs["thinwire"].append(run_thinwire(a, os.path.join(a.out, f"thinwire{r}")))
        runs["torchft"].append(run_torchft(a, os.path.join(a.out, f"torchft{r}")))
        print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    mean = {k: sum(x["step_time_s"] for x in v) / len(v) for k, v in runs.items()}
    summary = {"runs": runs, "mean_step_time_s": mean, "thinwire_over_torchft": mean["thinwire"] / mean["torchft"],
               "val_loss": {k: v[0]["val_loss"] for k, v in runs.items()}}
    manifest.write(os.path.join(a.out, "compare.json"), summary, "bench/torchft_peer.py", argv)
    print(json.dumps({k: summary[k] for k in ("mean_step_time_s", "thinwire_over_torchft", "val_loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
