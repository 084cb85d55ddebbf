"""A network clock: step time of a data-parallel method from its collective calls, a link
model and a measured (or modelled) compute time, so that methods can be compared at the
compute/network ratio users run at rather than at this 2-core machine's.

This file is the CLI (``main``: the user-scale projections' report); the clock's parts:

- bench/harness/netclock_model.py: the model (call time, overlap rules per mode, round time)
- bench/harness/netclock_project.py: the presets, the methods' calls and codec time, the projected rows
- bench/harness/netclock_ttt.py: steps to target from the 4-rank time-to-target protocol (``--ttt``)
- bench/harness/netclock_report.py: the tables, the goals, SparseLoCo's bytes against p and the plots
"""
from __future__ import annotations

import argparse
import os
import sys

from harness import RESULTS, manifest
from harness.netclock_project import (BUCKET_BYTES, COPY_BANDWIDTH, FUSED_EFFICIENCY, ISLAND_GBYTE, ISLAND_LATENCY_S,
                                      PASS_EFFICIENCY, PRESETS, TORCHFT_BUCKET_VALUES, island_calls, island_step_s,
                                      methods)
from harness.netclock_report import (bytes_plot, bytes_vs_p, formula_checks, goals, preset_table, sparse_goals,
                                     sweep_plot)
from harness.netclock_ttt import TTT_FILES, run_ttt, steps_to_target, ttt_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="user-scale projections of the network clock")
    ap.add_argument("--efficiency", type=float, default=PASS_EFFICIENCY,
                    help="codec pass efficiency (fraction of the device copy bandwidth)")
    ap.add_argument("--fused-efficiency", type=float, default=FUSED_EFFICIENCY,
                    help="efficiency of the fused (Triton) EF + int8 pass, charged at its floor bytes")
    ap.add_argument("--eager-only", action="store_true",
                    help="no fused kernels (comm.compile=false): every codec pass at --efficiency")
    ap.add_argument("--copy-bandwidth", type=float, default=COPY_BANDWIDTH, help="device copy bandwidth, B/s")
    ap.add_argument("--torchft-bucket-mb", type=float, default=TORCHFT_BUCKET_VALUES * 4 / 2 ** 20,
                    help="torchft's bucket_cap_mb (MB of the fp32 pseudo-gradient per all-reduce call; each call "
                         "pays latency x hops); 0: one call per fragment, as thinwire's")
    ap.add_argument("--bucket-mb", type=float, default=BUCKET_BYTES / 2 ** 20,
                    help="DDP's bucket_cap_mb in the projection (every bucket pays latency x hops)")
    ap.add_argument("--island-gbyte", type=float, default=ISLAND_GBYTE,
                    help="the link inside a replica of several GPUs (FSDP2's island), GB/s per GPU and direction")
    ap.add_argument("--island-latency-us", type=float, default=ISLAND_LATENCY_S * 1e6,
                    help="latency per message inside an island, microseconds")
    ap.add_argument("--out", default=os.path.join(RESULTS, "netclock_projection"))
    ap.add_argument("--ttt", default=None, help="first run these comma-separated TTT_ROWS through the 4-rank "
                    "time-to-target protocol (cached)")
    ap.add_argument("--ttt-S", type=int, default=160, help="the protocol's S for --ttt (the projection reads S = 160)")
    a = ap.parse_args(argv)
    if a.ttt:
        run_ttt([r.strip() for r in a.ttt.split(",") if r.strip()], a.ttt_S)
    for name in ("efficiency", "fused_efficiency"):
        if not 0 < getattr(a, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(a, name)}: must be in (0, 1]")
    if not a.bucket_mb > 0:
        raise SystemExit(f"--bucket-mb={a.bucket_mb}: must be > 0")
    if not a.island_gbyte > 0 or a.island_latency_us < 0:
        raise SystemExit(f"--island-gbyte={a.island_gbyte} --island-latency-us={a.island_latency_us}: "
                         f"need a bandwidth > 0 and a latency >= 0")
    island = {"island_gbyte": a.island_gbyte, "island_latency_s": a.island_latency_us * 1e-6}
    opts = {"efficiency": a.efficiency, "copy_bandwidth": a.copy_bandwidth, "bucket_bytes": int(a.bucket_mb * 2 ** 20),
            "fused_efficiency": a.fused_efficiency, **island}
    rows = methods(fused=not a.eager_only, torchft_bucket_values=int(a.torchft_bucket_mb * 2 ** 20 / 4))
    ttt, target, S = steps_to_target()
    never = ttt.get("never synchronise")
    assert never is not None and never[0] is None, f"'never synchronise' reached the target ({never}): too easy"
    md = [f"`python bench/netclock.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`: "
          f"codec at {a.efficiency:.0%} of {a.copy_bandwidth / 1e12:.1f} TB/s (eager passes)"
          f"{'' if a.eager_only else f' and {a.fused_efficiency:.0%} (the fused EF + int8 pass, comm.compile=true)'}, "
          f"DDP buckets of {a.bucket_mb:g} MB, torchft's of "
          f"{f'{a.torchft_bucket_mb:g} MB' if a.torchft_bucket_mb else 'one per fragment'}; inside a replica of "
          f"several GPUs (FSDP2's island) {a.island_gbyte:g} GB/s per GPU and {a.island_latency_us:g} us per message; "
          f"steps to target from the 4-rank "
          f"runs (S = {S}, target {target:.4f}, seed 0; quality at 8-64 replicas is assumed, not measured).", "",
          "Steps to target (bench/time_to_target.py's protocol; " + ", ".join(TTT_FILES) + "):", "", ttt_table(), ""]
    doc = {"efficiency": a.efficiency, "fused_efficiency": None if a.eager_only else a.fused_efficiency,
           "copy_bandwidth": a.copy_bandwidth, "S": S, "target": target, "presets": {}}
    for pre in PRESETS:
        table, res = preset_table(pre, rows, ttt, opts, S=S)
        at1 = res if pre.gbit == 1.0 else preset_table(pre, rows, ttt, opts, 1.0, S=S)[1]
        forward, backward = island_calls(pre)
        inside = {"bytes_per_gpu_step": sum(c.nbytes for c in forward + backward),
                  "exposed_s_per_step": island_step_s(pre, **island)}
        md += [f"### {pre.name}: {pre.replicas} replicas x {pre.gpus} GPU(s), {pre.tokens // 1024}K tokens/replica/step, "
               f"{pre.gbit:g} Gbit/s, {pre.latency_s * 1e3:.0f} ms; compute {pre.compute_s:.3g} s/step; "
               f"engine={pre.engine}", ""]
        if forward:
            md += [f"Inside each replica (FSDP2 over {pre.gpus} GPUs: all-gathers in forward and backward, "
                   f"reduce-scatters): {inside['bytes_per_gpu_step'] / 1e9:.3g} GB per GPU per step at "
                   f"{a.island_gbyte:g} GB/s, {inside['exposed_s_per_step']:.3g} s/step not hidden by compute "
                   f"(in every row's step time).", ""]
        md += [table]
        md += goals(pre, res, at1) + sparse_goals(at1) + [""]
        doc["presets"][pre.name] = {"table": res, "at_1gbit": at1, "engine": pre.engine, "island": inside}
    png = a.out + "_sweep.png"
    sweep_plot(rows, opts, png)
    md += [f"![utilisation vs bandwidth]({os.path.basename(png)})", ""]
    checks, doc["formula_checks_7B"] = formula_checks(PRESETS[1])
    md += ["### SparseLoCo's exchange against p: all-gather vs two_phase", "",
           "Bytes one rank sends per exchange (two_phase: the busiest rank), by bench/exchange_bytes.py's accounting "
           "formulas over a LLaMA layout of each preset's shapes (`bench/harness/netclock_project.py`: `shapes`), "
           "per parameter times the preset's N; the tables above charge the same bytes at the preset's p "
           "(traffic inside a replica's island is not in these bytes: it never crosses the slow link).", ""]
    for pre in PRESETS:
        md += [f"{pre.name} (N = {pre.params:.3g}):", "", bytes_vs_p(pre)]
    bytes_png = a.out + "_bytes.png"
    bytes_plot(bytes_png)
    md += ["Checks by formula at the 7B preset's shapes (LLaMA-7B's 291 tensors):", "", *checks, "",
           f"![bytes per rank vs p]({os.path.basename(bytes_png)})"]
    manifest.write(a.out + ".md", "\n".join(md) + "\n", "bench/netclock.py", argv)
    manifest.write(a.out + ".json", doc, "bench/netclock.py", argv)
    manifest.record([png, bytes_png], "bench/netclock.py", argv)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
