"""The network clock's report: a preset's table of every projected row (step time,
utilisation, time to target), the issue's goals at it, SparseLoCo's bytes per rank against p
(all-gather vs two_phase) and the formula's checks, and the utilisation-vs-bandwidth and
bytes-vs-p plots (bench/netclock.py writes them).
"""
from __future__ import annotations

from .netclock_project import EXCHANGES, PRESETS, Method, Preset, data_calls, project, sparse_exchange
from .netclock_ttt import ASSUMED
from .time_to_target import fair_warmup


# -- the report: python bench/netclock.py [--efficiency E] -------------------------------------
def preset_table(pre: Preset, rows: list, ttt: dict, opts: dict, gbit: float | None = None,
                 S: int = 160) -> tuple[str, dict]:
    """Markdown table of every method at ``pre`` (and its goal numbers); ``opts``: ``project``'s
    efficiency, copy_bandwidth and bucket_bytes; ``S``: the protocol's, for a peer's plain-DDP
    warm-up (``Method.dense_warmup``: its first ``fair_warmup`` steps at DDP fp32's step time)."""
    p, N = pre.replicas, pre.params
    from thinwire.comm.accounting import collective_bytes

    bf16_ar = collective_bytes("all_reduce", int(N), 2, p)
    out = ["| method | B sent/rank/step (x bf16 all-reduce) | step s | exposed network s/step (latency) | "
           "codec s/step | step-time utilisation | steps to target (x S, 4 ranks) | time to target / compute-only |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    res = {}
    out.append(f"| compute-only limit (infinitely fast network; dense's steps) | 0 | {pre.compute_s:.3g} | 0 | 0 | "
               f"100.0% | 1.00 | 1.00x |")
    fp32_step = project(Method("DDP fp32", "ddp", "all_reduce", 4.0), pre, gbit, **opts).step_s
    for group, prow, m in rows:
        rt = project(m, pre, gbit, **opts)
        sent = sum(c.nbytes for g in data_calls(m, pre, opts["bucket_bytes"]) for c in g) / m.H
        f, how, note, warm = None, "not measured", "", 0.0
        if prow and prow in ttt:
            f, how = ttt[prow]
        elif m.name in ASSUMED and ASSUMED[m.name][0] in ttt:
            f, how = ttt[ASSUMED[m.name][0]]
            note = " (assumed: " + ASSUMED[m.name][1] + ")"
        if m.dense_warmup and prow:
            warm = fair_warmup(prow, S) / S
            note += f" (first {warm:.3f} S plain DDP fp32, {fp32_step:.3g} s/step)"
        tt = (warm * fp32_step + (f - warm) * rt.step_s) / pre.compute_s if f else None
        res[m.name] = {"group": group, "H": m.H, "F": m.F, "step_s": rt.step_s, "utilisation": rt.utilisation,
                       "steps_x_S": f, "assumed": bool(f) and not (prow and prow in ttt),
                       "ttt_over_compute_only": tt, "how": how, "warmup_x_S": warm,
                       # 'not reached by 2S': the time to target is above this (its 2S steps)
                       "ttt_lower_bound": ((warm * fp32_step + (2 - warm) * rt.step_s) / pre.compute_s
                                           if f is None and how == "not reached by 2S" else None)}
        out.append(f"| {m.name} | {sent:.3g} ({sent / bf16_ar:.3g}) | {rt.step_s:.3g} | "
                   f"{rt.exposed_s / m.H:.3g} ({rt.latency_s / m.H:.2g}) | {rt.codec_s / m.H:.2g} | "
                   f"{rt.utilisation * 100:.1f}% | {_steps(f, how)}{note} | "
                   f"{f'{tt:.2f}x' if tt else (_gt(res[m.name]['ttt_lower_bound']) or '-')} |")
    return "\n".join(out) + "\n", res


def _x(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.3g}"


def _gt(bound: float | None) -> str:
    return f"> {bound:.2f}x" if bound else ""


def _steps(f: float | None, how: str) -> str:
    if f is None:
        return how
    return f"<= {f:.2f}" if how.startswith("<=") else f"{f:.2f}"


def goals(pre: Preset, res: dict, at1: dict) -> list[str]:
    """The issue's goals at ``pre`` from its table ``res`` (and ``at1``: the table at 1 Gbit/s)."""
    ok = {True: "met", False: "**missed**"}
    # thinwire's modes with steps to target of their own (not ``ASSUMED`` from another row)
    tw = {k: v for k, v in res.items() if v["group"] == "thinwire" and v["ttt_over_compute_only"] and not v["assumed"]}
    out = []
    if tw:
        best = min(tw, key=lambda k: tw[k]["ttt_over_compute_only"])
        b = tw[best]["ttt_over_compute_only"]
        out.append(f"- best thinwire mode to the target (steps measured): {best}, "
                   f"{b:.2f}x the compute-only limit "
                   f"(time-to-target utilisation {100 / b:.0f}%); goal <= 1.25x: {ok[b <= 1.25]}")
        for peer, bound in (("DDP bf16 (thinwire comm=bf16)", 10), ("torch PowerSGD r4", 1.5),
                            ("torch PostLocalSGD H=8", 1.5), ("torchft DiLoCo H=8 (fp8)", 1.0),
                            ("torchft streaming H=8 F=4 tau=1 (fp8)", 1.0)):
            v = res.get(peer)
            if v and peer.startswith("torchft") and (v["H"], v["F"]) == (res[best]["H"], res[best]["F"]):
                peer += " [the same H and fragments as the best mode]"
            if v and v["ttt_over_compute_only"]:
                s = v["ttt_over_compute_only"] / b
                out.append(f"- vs {peer}: {_x(s)}x faster to the target "
                           f"(peer's bound: {v['ttt_over_compute_only']:.2f}x "
                           f"the compute-only limit); goal >= {bound:g}x: {ok[s >= bound]}")
            elif v and v["ttt_lower_bound"]:
                s = v["ttt_lower_bound"] / b
                out.append(f"- vs {peer}: > {_x(s)}x faster to the target (the peer does not reach it by 2S: its "
                           f"time to target > {v['ttt_lower_bound']:.2f}x the compute-only limit, its bound); "
                           f"goal >= {bound:g}x: {ok[s >= bound]}")
            elif v:
                out.append(f"- vs {peer}: steps to target not measured ({v['how']}); per step {v['step_s']:.3g} s vs "
                           f"{res[best]['step_s']:.3g} s ({v['step_s'] / res[best]['step_s']:.1f}x): goal not assessed")
    else:
        out.append("- no thinwire mode has a measured steps-to-target: time-to-target goals not assessed")
    if tw:
        v = at1[best]
        out.append(f"- step-time utilisation at 1 Gbit/s of the best mode to the target ({best}): "
                   f"{v['utilisation'] * 100:.1f}% (time-to-target utilisation at 1 Gbit/s: "
                   f"{100 / v['ttt_over_compute_only']:.0f}%); goal >= 95%: {ok[v['utilisation'] >= 0.95]}")
    u = max(((k, v) for k, v in at1.items() if v["group"] == "thinwire"), key=lambda kv: kv[1]["utilisation"])
    out.append(f"- highest step-time utilisation of any thinwire mode at 1 Gbit/s: {u[0]}, "
               f"{u[1]['utilisation'] * 100:.1f}% (>= 95%: {ok[u[1]['utilisation'] >= 0.95]}; steps to target: "
               f"{_steps(u[1]['steps_x_S'], u[1]['how'])})")
    return out


def sparse_goals(at1: dict) -> list[str]:
    """SparseLoCo's step-time utilisation at 1 Gbit/s (``at1``: a preset's table there), two_phase
    vs all-gather, and H=8 two_phase's time to target there (steps assumed: the all-gather's);
    the goal (issue 34): H = 15 through two_phase >= 95%."""
    u = {k: at1[f"sparseloco H={k}"]["utilisation"] * 100 for k in
         ("8 two_phase", "15 two_phase", "30 two_phase", "8 all-gather", "15 all-gather")}
    t8 = at1["sparseloco H=8 two_phase"]["ttt_over_compute_only"]
    return [f"- SparseLoCo at 1 Gbit/s through two_phase: H=15 {u['15 two_phase']:.1f}% (goal >= 95%: "
            f"{'met' if u['15 two_phase'] >= 95 else '**missed**'}), H=8 {u['8 two_phase']:.1f}%, H=30 "
            f"{u['30 two_phase']:.1f}%; through the all-gather: H=15 {u['15 all-gather']:.1f}%, "
            f"H=8 {u['8 all-gather']:.1f}%"
            + (f"; H=8 two_phase's time to target at 1 Gbit/s {t8:.2f}x the compute-only limit (its steps "
               f"assumed: the all-gather's)" if t8 else "")]


P_RANGE = (2, 4, 8, 16, 32, 64)


def bytes_vs_p(pre: Preset, ps=P_RANGE, H: int = 15) -> str:
    """Markdown: bytes one rank sends per SparseLoCo exchange at ``pre``'s N against p, all-gather
    vs two_phase (the busiest rank; ``sparse_exchange``), and per inner step at ``H`` against a
    bf16 ring all-reduce of the model every step."""
    from thinwire.comm.accounting import collective_bytes

    out = [f"| p | all-gather B/rank/exchange | two_phase B/rank/exchange | two_phase / all-gather | "
           f"two_phase bytes(p) / bytes(2) | per inner step at H={H} vs a bf16 all-reduce: all-gather | two_phase |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    b2 = sum(sparse_exchange(pre, "two_phase", 2))
    for p in ps:
        ag, tp = (sum(sparse_exchange(pre, ex, p)) for ex in EXCHANGES)
        bf16 = collective_bytes("all_reduce", int(pre.params), 2, p)
        out.append(f"| {p} | {ag:.4g} | {tp:.4g} | {tp / ag:.3g} | {tp / b2:.3f} | 1/{H * bf16 / ag:.0f} | "
                   f"1/{H * bf16 / tp:.0f} |")
    return "\n".join(out) + "\n"


def formula_checks(pre: Preset, ps=range(2, 65), H: int = 15) -> tuple[list[str], dict]:
    """Issue 34's checks by formula at ``pre``'s shapes (the 7B preset: LLaMA-7B's): two_phase's
    bytes(p) / bytes(2) <= 2 at every p in ``ps``, and per inner step at ``H`` <= 1/400 of a bf16
    all-reduce at the largest p (the all-gather's beside it)."""
    from thinwire.comm.accounting import collective_bytes

    ok = {True: "met", False: "**missed**"}
    ps = list(ps)
    tp = {p: sum(sparse_exchange(pre, "two_phase", p)) for p in ps}
    worst = max(ps, key=lambda p: tp[p] / tp[ps[0]])
    g = tp[worst] / tp[ps[0]]
    last = ps[-1]
    bf16 = collective_bytes("all_reduce", int(pre.params), 2, last)
    ag = sum(sparse_exchange(pre, "allgather", last))
    r_tp, r_ag = H * bf16 / tp[last], H * bf16 / ag
    doc = {"max_growth": g, "max_growth_p": worst, "p": last, "per_step_vs_bf16_two_phase": 1 / r_tp,
           "per_step_vs_bf16_allgather": 1 / r_ag}
    return [f"- two_phase bytes(p) / bytes({ps[0]}) at every p in {ps[0]}..{last}: at most {g:.3f} (p = {worst}); "
            f"goal <= 2: {ok[g <= 2]}",
            f"- at p = {last}, per inner step at H = {H}: two_phase 1/{r_tp:.0f} of a bf16 all-reduce every step "
            f"(goal <= 1/400: {ok[r_tp >= 400]}); the all-gather 1/{r_ag:.0f} (per exchange: 1/{r_tp / H:.1f} "
            f"and 1/{r_ag / H:.1f})"], doc


def bytes_plot(path: str, ps=P_RANGE) -> None:
    """Bytes per rank per SparseLoCo exchange against p at every preset, all-gather vs two_phase,
    beside a bf16 all-reduce of the model (one step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thinwire.comm.accounting import collective_bytes

    fig, axes = plt.subplots(1, len(PRESETS), figsize=(5 * len(PRESETS), 4.5))
    for ax, pre in zip(axes, PRESETS):
        for ex, style in zip(EXCHANGES, ("o-", "s-")):
            ax.plot(ps, [sum(sparse_exchange(pre, ex, p)) for p in ps], style, label=f"sparseloco {ex}")
        ax.plot(ps, [collective_bytes("all_reduce", int(pre.params), 2, p) for p in ps], "k:",
                label="bf16 all-reduce (one step)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("replicas p")
        ax.set_title(f"{pre.name}: bytes per rank per exchange")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bytes one rank sends (two_phase: the busiest)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SparseLoCo's exchange against p, by the accounting formulas (bench/netclock.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_plot(rows: list, opts: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gbits = [0.1 * 10 ** (k / 8) for k in range(0, 25)]  # 0.1 .. 100 Gbit/s
    fig, axes = plt.subplots(1, len(PRESETS), figsize=(6 * len(PRESETS), 5.5), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, pre in zip(axes, PRESETS):
        for k, (group, _row, m) in enumerate(rows):
            ys = [project(m, pre, g, **opts).utilisation * 100 for g in gbits]
            style = {"baseline": "-", "peer": "--", "thinwire": "-"}[group]
            ax.plot(gbits, ys, style, color="black" if group == "baseline" else cmap(k % 20),
                    lw=2 if group == "baseline" else 1.2, label=m.name)
        ax.axvline(pre.gbit, color="gray", lw=0.8, ls=":")
        ax.axhline(95, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("link Gbit/s per rank")
        ax.set_title(f"{pre.name}: {pre.replicas} replicas x {pre.gpus} GPU, {pre.latency_s * 1e3:.0f} ms, "
                     f"compute {pre.compute_s:.2g} s/step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("step-time utilisation (compute / step time), %")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("network clock projection (bench/netclock.py): utilisation vs bandwidth; dotted: the preset's link, 95%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
