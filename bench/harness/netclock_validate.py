"""The network clock (bench/netclock.py) against the real shaped network (launch/netsim).

    sudo python bench/netclock_validate.py                  # 2 hosts at 10 Mbit/s, 8 rows, ~15 min
    sudo python bench/netclock_validate.py --rows "ddp fp32,local H=8" --steps 24

Per row, two runs of bench/cluster_peer.py with one rank per namespace (one torch thread per
rank, so one rank per core on this 2-core machine), same config, ``--log-calls``:

1. *unshaped* (``launch/netsim run 2 none``): compute + codec per step = its mean
   ``step_time_s - comm_wait_s`` (the only wall-clock input to the clock), and its mean
   ``comm_wait_s`` as a floor under the network part: no link makes a step wait less than
   the unshaped one does (gloo's CPU work and the ranks' skew: a collective waits for the
   slower rank, ms per step on 2 shared cores even without shaping);
2. *shaped* (tc tbf at ``--rate``): the measured step time, and the collective calls the
   accounting logged for every step (kind, bytes, group size).

The clock predicts the shaped run's mean step time over steps ``--skip``+1 .. ``--steps``
(whole rounds): compute + max(the clock's exposed network time per step, the floor), from
(1) and (2)'s calls, with a per-call cost and a goodput per collective kind fitted on the
same links by bench/cluster_peer_probe.py (seconds per 4-byte call; payload bandwidth of
its 64 KiB calls, 40 of each, as a fraction of the tbf rate). tc here has no netem, so no
delay can be added: WAN latency is modelled, never validated. This rule was settled after
a first pass (compute = step - wait, no floor, nominal rate: docs/cluster.md gives both).
Tolerance (the issue's): +-10% where
bytes/bandwidth is >= 80% of the modelled network time, +-25% for latency-dominated rows.

Needs root and network namespaces (launch/netsim check); exits 0 with a message otherwise.
Writes bench/results/netclock_validation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from . import BENCH, REPO, RESULTS, manifest
from .catalogue import spelt
from .netclock_model import Call, Link, round_time
from .netclock_project import Method, bucket_calls, payload_bytes_per_value
from .tables import failed_rows, md_row

ROOT = REPO
NETSIM = os.path.join(ROOT, "launch", "netsim")
OUT = os.path.join(RESULTS, "netclock_validation")
# 2 layers, d=96 (~0.23 M params, 0.9 MB of fp32 gradients): at 10 Mbit/s dense fp32's
# all-reduce (~0.73 s) is 25-50x one step's compute on one core
MODEL = ["model.n_layer=2", "model.n_embd=96", "model.n_head=4", "model.block_size=32", "data.batch_size=8"]
# label, clock mode, H, tau, overrides


# label, clock mode, H, tau, overrides


def _spelt(ov: list[str]) -> list[str]:
    return ov if any(o.startswith("comm=") for o in ov) else ["comm=none", *ov]


# label, clock mode, H, tau, overrides (the catalogue's row, comm=none spelt out)
ROWS = [(label, mode, H, tau, spelt(row)) for label, mode, H, tau, row in (
    ("ddp fp32", "ddp", 1, 0, "dense"), ("bf16", "ddp", 1, 0, "bf16"),
    ("int8 two-phase + ef", "ddp", 1, 0, "int8 two-phase + ef"), ("topk 1% + ef (all-gather)", "ddp", 1, 0, "topk 1% + ef"),
    ("local H=8", "local", 8, 0, "local H=8"), ("co2 H=8", "overlap", 8, 0, "co2 H=8"),
    ("eager H=8", "overlap", 8, 0, "eager H=8"), ("stream H=8 F=2 tau=1", "streaming", 8, 1, "stream H=8 F=2 tau=1"))]


# the projection's byte formula for each row (bench/harness/netclock_project.py's Method), checked against the
# logged calls: (collective, compressor and its options or None = fp32, H)
FORMULA = {"ddp fp32": ("all_reduce", None, {}, 1), "bf16": ("all_reduce", "bf16", {}, 1),
           "int8 two-phase + ef": ("two_phase", "int8", {}, 1),
           "topk 1% + ef (all-gather)": ("all_gather", "topk", {"ratio": 0.01}, 1),
           "local H=8": ("all_reduce", None, {}, 8), "co2 H=8": ("all_reduce", None, {}, 8),
           "eager H=8": ("all_reduce", None, {}, 8), "stream H=8 F=2 tau=1": ("all_reduce", None, {}, 8)}


def formula_bytes_per_step(label: str, numel: int, p: int) -> float:
    """Data bytes per step by the projection's formula (whole model in one bucket / flat call)."""
    coll, comm, kw, H = FORMULA[label]
    m = Method(label, "ddp", coll, 4.0 if comm is None else payload_bytes_per_value(comm, **kw))
    return sum(c.nbytes for c in bucket_calls(m, numel, p)) / H


def netsim(hosts: int, rate: str, args: list[str], work: str, tag: str, timeout: float = 900) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "NETSIM_PREFIX": "twk", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    with open(os.path.join(work, f"{tag}.log"), "w") as log:
        p = subprocess.run(["bash", NETSIM, "run", str(hosts), rate, "--", *args], stdout=log,
                           stderr=subprocess.STDOUT, env=env, cwd=work, timeout=timeout)
    if p.returncode != 0:
        with open(os.path.join(work, f"{tag}.log")) as fh:
            raise RuntimeError(f"{tag} failed (rc {p.returncode}):\n{fh.read()[-3000:]}")


def probe(hosts: int, rate: str, work: str, calls: int) -> dict:
    """Seconds per call by case, mean over ranks (bench/cluster_peer_probe.py; reused from
    ``work`` if there)."""
    out = os.path.join(work, f"probe-{rate}")
    if not os.path.exists(os.path.join(out, f"probe{hosts - 1}.json")):
            netsim(hosts, rate, [os.path.join(BENCH, "cluster_peer_probe.py"), "--out", out, "--calls", str(calls)],
               work, f"probe-{rate}")
    ranks = [json.load(open(os.path.join(out, f"probe{r}.json"))) for r in range(hosts)]
    return {case: {"seconds_per_call": sum(r["cases"][case]["seconds_per_call"] for r in ranks) / hosts,
                   "payload_per_call": ranks[0]["cases"][case]["payload_per_call"]}
            for case in ranks[0]["cases"]}


def fit_per_call(cases: dict, gbit: float) -> dict:
    """Per collective kind: the fixed cost of one call = seconds per 4-byte call minus its
    bytes / bandwidth (~0); the goodput = the payload bandwidth of the 1 MiB calls after that
    fixed cost, as a fraction of the nominal rate (64 KiB: reported as a check)."""
    out = {}
    for kind in ("all_reduce", "all_gather", "all_to_all"):
        small = cases[f"{kind} 1 fp32"]
        a = max(0.0, small["seconds_per_call"] - small["payload_per_call"] * 8 / (gbit * 1e9))
        out[kind] = {"per_call_s": a}
        for size in ("64 KiB", "1 MiB"):
            c = cases[f"{kind} {size}"]
            out[kind][f"goodput_{size.replace(' ', '')}"] = \
                c["payload_per_call"] * 8 / max(1e-9, c["seconds_per_call"] - a) / (gbit * 1e9)
    return out


def run_row(row, hosts: int, rate: str, steps: int, work: str, tag: str) -> dict:
    label, _mode, _H, _tau, ov = row
    d = os.path.join(work, tag)
    done = os.path.exists(os.path.join(d, "rank0.json"))  # reused from an earlier --work
    if not done:
        netsim(hosts, rate, [os.path.join(BENCH, "cluster_peer.py"), "--log-calls", "--stop-steps", str(steps),
                             "--eval-every", str(steps), "--out", d, "--", f"trainer.max_steps={steps}",
                             "trainer.sample_chars=0", "trainer.progress=false", "logger=none", "dist.backend=gloo",
                             "dist.threads=1", "data.eval_batches=1", *ov, *MODEL], work, tag)
    with open(os.path.join(d, "metrics.jsonl")) as fh:
        lines = [json.loads(x) for x in fh if x.strip()]
    return {"lines": lines, "rank0": json.load(open(os.path.join(d, "rank0.json")))}


def predict(row, shaped: dict, unshaped: dict, link: Link, skip: int, nominal: Link | None = None) -> dict:
    """The clock's mean step time over steps skip+1.. of the shaped run (module docstring)."""
    label, mode, H, tau, _ = row
    lines, calls = shaped["lines"], shaped["rank0"]["calls"]
    window = range(skip, len(lines))
    U = unshaped["lines"]
    c_mean = sum(U[i]["step_time_s"] - U[i]["comm_wait_s"] for i in window) / len(window)
    floor = sum(U[i]["comm_wait_s"] for i in window) / len(window)
    exposed = network = bw = 0.0
    for r0 in range(skip, len(lines), H):  # one round = H steps (H = 1: one step)
        rnd = [[Call(*c) for c in calls[i]] for i in range(r0, min(r0 + H, len(lines)))]
        data = [[c for c in step if c.kind == "data"] for step in rnd]
        control = [c for step in rnd for c in step if c.kind == "control"]
        groups = [g for g in data if g] if mode == "streaming" else [[c for g in data for c in g]]
        rt = round_time(mode, link, c_mean, groups, control, H=len(rnd) if mode != "ddp" else 1, tau=tau)
        exposed += rt.exposed_s
        network += rt.network_s
        bw += sum(link.bandwidth_part(c) for step in rnd for c in step)
    n = len(window)
    measured = sum(lines[i]["step_time_s"] for i in window) / n
    predicted = c_mean + max(exposed / n, floor)
    share = bw / network if network else 0.0
    tol = 0.10 if share >= 0.8 else 0.25
    err = predicted / measured - 1
    extra = {}
    if nominal is not None:  # the same clock at the nominal rate (goodput 1), for comparison
        n_pred = predict(row, shaped, unshaped, nominal, skip)["predicted_s"]
        extra = {"predicted_nominal_s": n_pred, "error_nominal": round(n_pred / measured - 1, 4)}
    return {**extra, "label": label, "mode": mode, "steps": f"{skip + 1}-{len(lines)}", "compute_s": round(c_mean, 4),
            "modelled_network_s_per_step": round(network / n, 4), "exposed_s_per_step": round(exposed / n, 4),
            "floor_s": round(floor, 4),
            "bandwidth_share": round(share, 3), "predicted_s": round(predicted, 4), "measured_s": round(measured, 4),
            "measured_comm_wait_s": round(sum(lines[i]["comm_wait_s"] for i in window) / n, 4),
            "error": round(err, 4), "tolerance": tol, "within": abs(err) <= tol,
            "wire_bytes_per_step": round(sum(lines[i]["wire_bytes"] for i in window) / n),
            "logged_bytes_per_step": round(sum(c[2] for i in window for c in calls[i]) / n)}


def markdown(doc: dict) -> str:
    out = [f"`{doc['command']}` ({doc['date']}): {doc['hosts']} hosts at {doc['rate']} (tc tbf), model "
           f"`{' '.join(MODEL)}`, steps {doc['rows'][0]['steps'] if doc['rows'] else '-'} of each run.", "",
           "Fitted on the same links (bench/cluster_peer_probe.py): per-call cost (4-byte calls) and goodput "
           "(64 KiB calls, used; 1 MiB calls in brackets, 5 calls each: not used) per collective: " + "; ".join(
               f"{k} {v['per_call_s'] * 1e3:.2f} ms, {v['goodput_64KiB']:.3f} ({v['goodput_1MiB']:.3f})"
               for k, v in doc["fit"].items()) + ". WAN latency: modelled, not validated (no netem here).", "",
           "| row | clock mode | compute s/step (unshaped run) | modelled network s/step | exposed (floor) | "
           "bytes/bandwidth share | predicted s/step | measured s/step | error | tolerance | | "
           "at the nominal rate: predicted (error) | projection's byte formula / logged data bytes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in doc["rows"]:
        out.append(md_row(r["label"], r["mode"], f"{r['compute_s']:.4f}", f"{r['modelled_network_s_per_step']:.4f}",
                          f"{r['exposed_s_per_step']:.4f} ({r['floor_s']:.4f})", f"{r['bandwidth_share']:.2f}",
                          f"{r['predicted_s']:.4f}", f"{r['measured_s']:.4f}", f"{r['error'] * 100:+.1f}%",
                          f"+-{r['tolerance'] * 100:.0f}%", "within" if r["within"] else "**outside**",
                          f"{r['predicted_nominal_s']:.4f} ({r['error_nominal'] * 100:+.1f}%)",
                          f"{r['formula_over_logged_data_bytes']:.3f}"))
    out += failed_rows(doc.get("failed", []), 13, 150)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="10mbit")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=8, help="steps left out at the start (a multiple of every H)")
    ap.add_argument("--probe-calls", type=int, default=40)
    ap.add_argument("--rows", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--work", default=None, help="work dir; runs and probe already there are reused")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    chk = subprocess.run(["bash", NETSIM, "check"], capture_output=True, text=True)
    if chk.stdout.strip() != "ok":
        print(f"bench/netclock_validate.py: launch/netsim {chk.stdout.strip() or chk.stderr.strip()}; nothing measured")
        return 0
    gbit = float(a.rate[:-4]) / 1e3 if a.rate.endswith("mbit") else float(a.rate[:-4])
    labels = a.rows.split(",") if a.rows else [r[0] for r in ROWS]
    rows = [r for r in ROWS if r[0] in labels]
    work = a.work or tempfile.mkdtemp(prefix="twclock")
    os.makedirs(work, exist_ok=True)
    print(f"bench/netclock_validate.py: work dir {work}", flush=True)
    t0 = time.perf_counter()
    fit = fit_per_call(probe(a.hosts, a.rate, work, a.probe_calls), gbit)
    per_call = {k: v["per_call_s"] for k, v in fit.items()}
    link = Link(gbit, 0.0, per_call, {k: v["goodput_64KiB"] for k, v in fit.items()})
    nominal = Link(gbit, 0.0, per_call)
    print("fit:", json.dumps(fit), flush=True)
    args = [x.replace(ROOT + os.sep, "") for x in (argv if argv is not None else sys.argv[1:])]
    doc = {"command": " ".join(["python", "bench/netclock_validate.py", *args]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rate": a.rate, "hosts": a.hosts,
           "fit": fit, "rows": [], "failed": []}
    for i, row in enumerate(rows):
        k = ROWS.index(row)
        try:
            unshaped = run_row(row, a.hosts, "none", a.steps, work, f"r{k}-none")
            shaped = run_row(row, a.hosts, a.rate, a.steps, work, f"r{k}-{a.rate}")
            r = predict(row, shaped, unshaped, link, a.skip, nominal)
            window = shaped["rank0"]["calls"][a.skip:]
            logged = sum(c[2] for step in window for c in step if c[1] == "data") / len(window)
            r["formula_over_logged_data_bytes"] = round(
                formula_bytes_per_step(row[0], shaped["rank0"]["numel"], a.hosts) / logged, 4)
        except (RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as e:
            doc["failed"].append({"label": row[0], "error": str(e)[-1500:]})
            print(f"{row[0]}: FAILED {str(e)[-800:]}", flush=True)
            continue
        doc["rows"].append(r)
        print(json.dumps(r), f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
        write(doc, a.out)
    doc["total_s"] = round(time.perf_counter() - t0)
    write(doc, a.out)
    print(markdown(doc))
    return 0


def write(doc: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    manifest.write(out + ".json", doc, command=doc["command"])
    manifest.write(out + ".md", markdown(doc), command=doc["command"])
