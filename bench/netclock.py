"""A network clock: step time of a data-parallel method from its collective calls, a link
model and a measured (or modelled) compute time, so that methods can be compared at the
compute/network ratio users run at rather than at this 2-core machine's.

The model (issue "time to quality at the scale users run")::

    call time      t(c) = latency x hops(c) + per_call(c) + bytes(c) / (bandwidth x goodput(c))
    hops           the sequential message rounds of the collective's standard algorithm
                   (thinwire/comm/accounting.py's table; the latency terms of Thakur,
                   Rabenseifner and Gropp 2005, "Optimization of collective communication
                   operations in MPICH"): ring all-reduce 2(p-1), ring all-gather /
                   reduce-scatter p-1, pairwise all-to-all p-1, pipelined broadcast p-1
    bytes(c)       bytes one rank sends in c, as thinwire's accounting charges them
                   (``collective_bytes``; all-gather grows with p-1)
    round time     H x compute + codec + exposed network        (a round = H steps; H = 1 for DDP)
    step time      round time / H

``per_call`` is zero and ``goodput`` one in projections (latency is modelled, the preset's
bandwidth is taken as payload bandwidth); on the shaped network both are fitted per collective
kind from ``bench/cluster_peer_probe.py`` (4-byte and 64 KiB calls on the same links), where tc
cannot add delay (bench/netclock_validate.py).

Overlap rules, per mode (what "exposed" means):

- ``ddp``: DDP buckets become ready one by one during backward (backward = 2/3 of compute,
  bucket i of B ready at i/B of it, equal buckets) and go out one after another on the one
  link: ``f_i = max(f_{i-1}, ready_i) + t(bucket i)``; exposed = ``f_B - backward`` (the
  tail after backward; one bucket: all of it). Control calls (thinwire's per-step loss and
  non-finite all-reduce) come after backward and are exposed.
- ``local`` (local SGD / DiLoCo / SparseLoCo / PostLocalSGD): every call blocks at the end
  of the round: exposed = sum t(c).
- ``overlap`` (CO2, Sun et al. 2024, arXiv 2401.16265, Alg. 1; eager updates, Kale et al.
  2025, arXiv 2502.12996): the round's outer all-reduce runs during the next round's H steps
  of compute: exposed = max(0, t(data) - H x compute); control calls block.
- ``streaming`` (Streaming DiLoCo, arXiv 2501.18512, Alg. 1): F fragments of ~N/F values,
  one every H/F steps, each overlapping tau inner steps (tau < H/F: at most one in flight):
  exposed = sum_j max(0, t(fragment j) - tau x compute).

Projections (``project``): the issue's presets, bytes from the accounting formulas at the
preset's p and N (``bucket_calls``), DDP's 25 MB buckets of fp32 gradients, the compressors'
own bytes per value (``payload_bytes_per_value``). PowerSGD (Vogels et al. 2019, arXiv
1905.13727) sends P and Q of rank r per matrix: (n + m) r values, with n, m from a GPT's
shapes (``Preset.d_model``, ``layers``). torchft's fp8 all-reduce is counted at 1 B/value.

Codec (compress + decompress) time is added serially: it runs on the same device as
compute (a GPU's copy engine is not modelled), so it is never hidden. In projections it is
bytes touched / (device copy bandwidth x pass efficiency), never the CPU's time.
Departures: no congestion between concurrent calls (the link is serial, and overlapped
traffic gets the full link), no NCCL channel pipelining across buckets (each bucket pays
its latency x hops: pessimistic for DDP at high latency, as the issue prescribes), no
straggler or failure time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

SYNC_MODES = ("ddp", "local", "overlap", "streaming")
BACKWARD_FRACTION = 2 / 3   # backward ~ 2x forward (6N flops per token: 2N forward, 4N backward)


def hops(collective: str, p: int) -> int:
    """Sequential message rounds of the collective's standard algorithm over p ranks."""
    if p <= 1:
        return 0
    if collective == "all_reduce":
        return 2 * (p - 1)
    if collective in ("all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        return p - 1
    raise ValueError(f"collective={collective!r}: expected all_reduce, all_gather, reduce_scatter, "
                     f"all_to_all or broadcast")


@dataclass(frozen=True)
class Call:
    """One collective call as the accounting logged it: ``nbytes`` this rank sends."""
    collective: str
    kind: str       # data | control (thinwire.comm.accounting.KINDS)
    nbytes: int
    p: int

    @property
    def messages(self) -> int:
        return hops(self.collective, self.p)


@dataclass(frozen=True)
class Link:
    """One rank's link: ``gbit`` (10^9 bit/s, each direction), ``latency_s`` per message,
    ``per_call_s``: a fitted fixed cost per call by collective (software, handshakes), and
    ``goodput``: the fraction of ``gbit`` a collective's payload gets (headers, ACKs, TCP
    over a shaper), fitted by collective; 1 where not given (projections)."""
    gbit: float
    latency_s: float = 0.0
    per_call_s: Mapping[str, float] = field(default_factory=dict)
    goodput: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.gbit > 0:
            raise ValueError(f"gbit={self.gbit!r}: must be > 0")
        if self.latency_s < 0:
            raise ValueError(f"latency_s={self.latency_s!r}: must be >= 0")

    def latency_part(self, c: Call) -> float:
        return self.latency_s * c.messages + self.per_call_s.get(c.collective, 0.0)

    def bandwidth_part(self, c: Call) -> float:
        return c.nbytes * 8 / (self.gbit * 1e9 * self.goodput.get(c.collective, 1.0))

    def time(self, c: Call) -> float:
        return self.latency_part(c) + self.bandwidth_part(c)

    def total(self, calls: Iterable[Call]) -> float:
        return sum(self.time(c) for c in calls)


def ddp_exposed(bucket_s: Sequence[float], backward_s: float) -> float:
    """Network time left after backward when bucket i (of B) is ready at (i+1)/B of backward
    and buckets go out one after another: ``f_i = max(f_{i-1}, ready_i) + t_i``."""
    f, B = 0.0, len(bucket_s)
    for i, t in enumerate(bucket_s):
        f = max(f, backward_s * (i + 1) / B) + t
    return max(0.0, f - backward_s) if B else 0.0


@dataclass(frozen=True)
class RoundTime:
    """One round (H steps) on the clock: compute, codec, the network time of all its calls,
    the part of it that is exposed, and the part of that which is latency."""
    H: int
    compute_s: float
    codec_s: float
    network_s: float
    exposed_s: float
    latency_s: float

    @property
    def total_s(self) -> float:
        return self.H * self.compute_s + self.codec_s + self.exposed_s

    @property
    def step_s(self) -> float:
        return self.total_s / self.H

    @property
    def utilisation(self) -> float:
        """Compute time / step time (the issue's step-time utilisation)."""
        return self.H * self.compute_s / self.total_s


def round_time(sync: str, link: Link, compute_s: float, data: Sequence[Sequence[Call]],
               control: Sequence[Call] = (), H: int = 1, tau: int = 0, codec_s: float = 0.0) -> RoundTime:
    """Time of one round under ``sync``'s overlap rule (module docstring). ``data``: the round's
    data calls grouped into units that travel together (DDP: buckets; streaming: fragments;
    local/overlap: usually one group), ``control``: blocking small calls."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync={sync!r}: expected one of {', '.join(SYNC_MODES)}")
    if H < 1 or compute_s < 0 or codec_s < 0:
        raise ValueError(f"H={H!r}, compute_s={compute_s!r}, codec_s={codec_s!r}: need H >= 1, times >= 0")
    if sync == "ddp" and H != 1:
        raise ValueError(f"H={H!r}: sync=ddp synchronises every step (H = 1)")
    if sync == "streaming" and (H % max(1, len(data)) or not 0 <= tau < H // max(1, len(data))):
        raise ValueError(f"tau={tau!r}: must be in [0, H/F) with F dividing H (H={H}, F={len(data)})")
    groups = [link.total(g) for g in data]
    ctrl = link.total(control)
    if sync == "ddp":
        exposed = ddp_exposed(groups, BACKWARD_FRACTION * compute_s)
    elif sync == "local":
        exposed = sum(groups)
    elif sync == "overlap":
        exposed = max(0.0, sum(groups) - H * compute_s)
    else:
        exposed = sum(max(0.0, g - tau * compute_s) for g in groups)
    calls = [c for g in data for c in g] + list(control)
    return RoundTime(H, compute_s, codec_s, sum(groups) + ctrl, exposed + ctrl,
                     sum(link.latency_part(c) for c in calls))


# -- projections: user-scale presets (fixed by the issue, before any measurement) ---------------
H100_BF16_PEAK = 989e12       # dense bf16 flop/s
MFU = 0.40
COPY_BANDWIDTH = 3.0e12       # device memory copy bandwidth, B/s (H100 SXM ~3.35 TB/s; the 3.0)
# fraction of COPY_BANDWIDTH a codec pass reaches. docs/gpu.md (H200, bench/compress_pass.py) defines
# it as the pass's floor bytes at the measured speed / the copy's bandwidth: eager codecs
# (comm.compile=false, the default) 0.11-0.18, so 0.15 for every pass without a fused kernel; the
# Triton EF + int8 pass (comm.compile=true on CUDA) 2.26x a copy at 256M values against a floor of
# 18 B/value = 2.25 copies (read g, e; write e, codes; read codes, write values): 2.25 / 2.26 = 0.996
# (sign1: 2.03 / 2.04 = 0.995). A fused pass is charged its floor's bytes at FUSED_EFFICIENCY.
PASS_EFFICIENCY = 0.15
FUSED_EFFICIENCY = 0.99
BUCKET_BYTES = 25 * 2 ** 20   # DDP's default bucket_cap_mb=25, of fp32 gradients


@dataclass(frozen=True)
class Preset:
    """A user-scale run: ``replicas`` data-parallel ranks of ``gpus`` GPUs each."""
    name: str
    params: float
    replicas: int
    gpus: int
    tokens: int          # per replica per step
    gbit: float
    latency_s: float
    d_model: int         # transformer shape for PowerSGD's P/Q sizes (12 L d^2 ~ params)
    layers: int

    @property
    def compute_s(self) -> float:
        """6 N tokens / (GPUs x 989e12 x 0.40): the issue's compute per step."""
        return 6 * self.params * self.tokens / (self.gpus * H100_BF16_PEAK * MFU)


PRESETS = (
    Preset("1B", 1e9, 8, 1, 64 * 1024, 1.0, 0.020, 2048, 20),
    Preset("7B", 7e9, 32, 8, 512 * 1024, 10.0, 0.020, 4096, 32),
    Preset("70B", 70e9, 64, 8, 1024 * 1024, 1.0, 0.050, 8192, 80),
)


@dataclass(frozen=True)
class Method:
    """How a method puts a model of N parameters on the wire.

    ``collective``: ``all_reduce`` (dense payload), ``all_gather`` (sparse payload, every rank
    receives p-1 payloads), ``two_phase`` (all-to-all of the payload + all-gather of a 1/p
    chunk), ``powersgd`` (three all-reduces per bucket: dense rank-1 tensors, P, Q).
    ``bytes_per_value``: payload bytes per parameter (thinwire's compressors' ``nbytes`` /
    numel, density and index bytes included). ``codec_bytes_per_value``: bytes the codec's
    eager passes touch per parameter per synchronisation (read + write);
    ``fused_bytes_per_value``: the floor bytes of the passes a fused kernel runs instead."""
    name: str
    sync: str
    collective: str
    bytes_per_value: float
    H: int = 1
    F: int = 1
    tau: int = 0
    codec_bytes_per_value: float = 0.0
    control: bool = True     # thinwire's per-step loss/non-finite all-reduce under sync=ddp
    powersgd_rank: int = 0
    fused_bytes_per_value: float = 0.0  # bytes of the passes a fused (Triton) kernel runs, at its floor
    dense_warmup: bool = False  # its protocol row starts with plain fp32 DDP steps (time_to_target.fair_warmup)
    bucket_values: int = 0   # outer syncs: at most this many values per call (0: one flat call per fragment)


def bucket_calls(m: Method, numel: int, p: int, pre: Preset | None = None) -> list[Call]:
    """The data calls of one bucket (or one flat outer all-reduce) of ``numel`` values."""
    payload = int(math.ceil(numel * m.bytes_per_value))
    if m.collective == "all_reduce":
        return [Call("all_reduce", "data", _cb("all_reduce", payload, p), p)]
    if m.collective == "all_gather":
        return [Call("all_gather", "data", _cb("all_gather", payload, p), p)]
    if m.collective == "two_phase":
        return [Call("all_to_all", "data", _cb("all_to_all", payload, p), p),
                Call("all_gather", "data", _cb("all_gather", int(math.ceil(payload / p)), p), p)]
    if m.collective == "powersgd":
        if pre is None:
            raise ValueError("powersgd needs the preset's transformer shape")
        # per layer: qkv (d x 3d), proj (d x d), fc (d x 4d), out (4d x d): sum (n + m) = 16 d
        frac = numel / pre.params
        pq = int(round(frac * pre.layers * 16 * pre.d_model * m.powersgd_rank * 4))
        dense = int(round(frac * pre.layers * 4 * pre.d_model * 4))  # biases/norms (a few d per layer) travel dense
        return [Call("all_reduce", "data", _cb("all_reduce", b, p), p) for b in (dense, pq // 2, pq - pq // 2)]
    raise ValueError(f"collective={m.collective!r}: expected all_reduce, all_gather, two_phase or powersgd")


def _cb(kind: str, nbytes: int, p: int) -> int:
    from thinwire.comm.accounting import collective_bytes  # the accounting's formula, evaluated at p
    return collective_bytes(kind, nbytes, 1, p)


CONTROL = 16  # thinwire's per-step agreement: 2 float64 (loss, non-finite flag)
# torchft 0.2.0's DiLoCo all-reduces a fragment's pseudo-gradient per parameter tensor by default;
# bucketized (use_bucketization=True) in buckets of bucket_cap_mb, default 1 GiB of the fp32
# pseudo-gradient, each bucket one fp8 all-reduce (torchft.collectives.allreduce_quantized: an
# all-to-all and an all-gather of 1 B/value, the ring all-reduce's bytes and 2 (p-1) hops). The
# projection takes the bucketized mode (fewer calls than one per tensor at these sizes).
TORCHFT_BUCKET_VALUES = 2 ** 30 // 4


def data_calls(m: Method, pre: Preset, bucket_bytes: int = BUCKET_BYTES) -> list[list[Call]]:
    """One round's data calls at the preset's p and N: DDP's buckets of ``bucket_bytes`` of fp32
    gradients (every bucket one collective, or two for two-phase, three for PowerSGD), or the
    F fragments of an outer all-reduce (one flat call each, as thinwire's averager sends it;
    ``Method.bucket_values``: split into that many values per call, as torchft's bucketized
    all-reduce does)."""
    N, p = int(pre.params), pre.replicas
    if m.sync == "ddp":
        B = max(1, math.ceil(N * 4 / bucket_bytes))
        return [bucket_calls(m, N // B, p, pre)] * B
    n = N // m.F
    k = max(1, math.ceil(n / m.bucket_values)) if m.bucket_values else 1
    return [bucket_calls(m, n // k, p, pre) * k] * m.F


def project(m: Method, pre: Preset, gbit: float | None = None, efficiency: float = PASS_EFFICIENCY,
            copy_bandwidth: float = COPY_BANDWIDTH, bucket_bytes: int = BUCKET_BYTES,
            fused_efficiency: float = FUSED_EFFICIENCY) -> RoundTime:
    """One round of ``m`` at ``pre`` (optionally at another bandwidth)."""
    p, N = pre.replicas, int(pre.params)
    link = Link(gbit or pre.gbit, pre.latency_s)
    codec = N / pre.gpus * (m.codec_bytes_per_value / efficiency + m.fused_bytes_per_value / fused_efficiency) \
        / copy_bandwidth  # sharded over the replica's GPUs
    if m.sync == "ddp":  # thinwire's per-step loss / non-finite agreement
        control = [Call("all_reduce", "control", _cb("all_reduce", CONTROL, p), p)] if m.control else []
    else:  # the outer step's non-finite flag, once per round
        control = [Call("all_reduce", "control", _cb("all_reduce", 4, p), p)]
    data = data_calls(m, pre, bucket_bytes)
    return round_time(m.sync, link, pre.compute_s, data, control, m.H, m.tau, codec)


def payload_bytes_per_value(comm: str, n: int = 1 << 20, **kw) -> float:
    """Bytes per value of thinwire compressor ``comm`` (its payload's ``nbytes`` on ``n``
    Gaussian values): the same number the accounting charges."""
    import torch

    from thinwire.comm import build_compressor

    c = build_compressor(comm, **kw)
    return c.compress(torch.randn(n, generator=torch.Generator().manual_seed(0))).nbytes / n


# Codec passes, bytes touched per parameter per synchronisation (read + write, fp32 = 4 B):
#   bf16 cast 4+2, back 2+4                                                        12
#   error feedback q = g + e (4+4+4); residual e = q - C(q) (4+4+4)                 24
#   int8 quantise 4+1, dequantise 1+4 (twice: owner's sum, final), owner re-quantise  ~15
#   top-k: |q| 4+4, selection ~2 passes of 4, decompress (zero + scatter) 4          20
#   outer step (local/DiLoCo): delta = anchor - x 12, SGD-Nesterov on momentum,
#   anchor and delta 20, x = anchor 8                                                40
#   co2: + the snapshot copy 8; SparseLoCo: + decayed EF 12, chunk top-k 8, residual 8, decode 4
#   torchft fp8: + quantise 5, dequantise 5; PowerSGD: M Q and M^T P read M twice (8),
#   EF 24, P Q^T 4
#   int8 with the fused EF + int8 pass (comm.compile=true on CUDA): that pass at its floor, 18
#   (docs/gpu.md), and eager the owner's dequantise-and-sum 1+4 and the final dequantise 1+4   10
CODEC = {"bf16": 12, "int8_ef": 24 + 15, "topk_ef": 24 + 20, "outer": 40, "co2": 48, "sparseloco": 40 + 32,
         "torchft_fp8": 50, "powersgd": 36, "int8_rest": 10}
FUSED = {"int8_ef": 18}


def int8_codec(fused: bool, extra: float = 0.0) -> dict:
    """``Method`` codec keywords of an int8 + EF row (plus ``extra`` eager bytes): the fused
    Triton pass where ``fused`` (comm.compile=true), else every pass eager."""
    if fused:
        return {"codec_bytes_per_value": extra + CODEC["int8_rest"], "fused_bytes_per_value": FUSED["int8_ef"]}
    return {"codec_bytes_per_value": extra + CODEC["int8_ef"]}


def methods(fused: bool = True, torchft_bucket_values: int = TORCHFT_BUCKET_VALUES) -> list[tuple[str, str, Method]]:
    """``(group, protocol row, Method)`` for every projected row; the protocol row names the
    4-rank time-to-target result its steps come from ('' = none measured; ``ASSUMED``: another
    row's). ``fused``: int8 rows run the fused EF + int8 pass (``comm.compile=true``);
    ``torchft_bucket_values``: values per torchft all-reduce call (0: one per fragment)."""
    bf16 = payload_bytes_per_value("bf16")
    int8 = payload_bytes_per_value("int8")
    topk = payload_bytes_per_value("topk", ratio=0.01)
    chunk = payload_bytes_per_value("chunk_topk")
    M = Method
    return [
        ("baseline", "dense", M("DDP fp32", "ddp", "all_reduce", 4.0)),
        ("peer", "bf16", M("DDP bf16 (thinwire comm=bf16)", "ddp", "all_reduce", bf16, codec_bytes_per_value=CODEC["bf16"])),
        ("peer", "torch PowerSGD r4", M("torch PowerSGD r4", "ddp", "powersgd", 0.0,
                                        codec_bytes_per_value=CODEC["powersgd"], powersgd_rank=4, dense_warmup=True)),
        ("peer", "torch PostLocalSGD H=8", M("torch PostLocalSGD H=8", "local", "all_reduce", 4.0, H=8, control=False)),
        ("peer", "", M("torchft DiLoCo H=8 (fp8)", "local", "all_reduce", 1.0, H=8, control=False,
                       codec_bytes_per_value=CODEC["torchft_fp8"], bucket_values=torchft_bucket_values)),
        ("peer", "", M("torchft streaming H=8 F=4 tau=1 (fp8)", "streaming", "all_reduce", 1.0, H=8, F=4, tau=1,
                       control=False, codec_bytes_per_value=CODEC["torchft_fp8"],
                       bucket_values=torchft_bucket_values)),
        ("thinwire", "", M("int8 two-phase + ef", "ddp", "two_phase", int8, **int8_codec(fused))),
        ("thinwire", "", M("topk 1% + ef", "ddp", "all_gather", topk, codec_bytes_per_value=CODEC["topk_ef"])),
        ("thinwire", "local H=8", M("local H=8", "local", "all_reduce", 4.0, H=8, control=False,
                                    codec_bytes_per_value=CODEC["outer"])),
        ("thinwire", "diloco H=8", M("diloco H=8", "local", "all_reduce", 4.0, H=8, control=False,
                                     codec_bytes_per_value=CODEC["outer"])),
        ("thinwire", "co2 H=8", M("co2 H=8", "overlap", "all_reduce", 4.0, H=8, control=False,
                                  codec_bytes_per_value=CODEC["co2"])),
        ("thinwire", "eager H=8", M("eager H=8", "overlap", "all_reduce", 4.0, H=8, control=False,
                                    codec_bytes_per_value=CODEC["co2"])),
        ("thinwire", "", M("co2 H=8 + int8", "overlap", "two_phase", int8, H=8, control=False,
                           **int8_codec(fused, CODEC["co2"]))),
        ("thinwire", "stream H=8 F=4 tau=1", M("stream H=8 F=4 tau=1", "streaming", "all_reduce", 4.0, H=8, F=4,
                                               tau=1, control=False, codec_bytes_per_value=CODEC["outer"])),
        ("thinwire", "stream H=8 F=4 tau=1 diloco-recipe",
         M("stream H=8 F=4 tau=1 diloco-recipe", "streaming", "all_reduce", 4.0, H=8, F=4, tau=1, control=False,
           codec_bytes_per_value=CODEC["outer"])),
        ("thinwire", "stream H=8 F=4 tau=1 + int8", M("stream H=8 F=4 tau=1 + int8", "streaming", "two_phase", int8,
                                                      H=8, F=4, tau=1, control=False,
                                                      **int8_codec(fused, CODEC["outer"]))),
        ("thinwire", "stream H=8 F=4 tau=1 diloco-recipe + int8",
         M("stream H=8 F=4 tau=1 diloco-recipe + int8", "streaming", "two_phase", int8, H=8, F=4, tau=1,
           control=False, **int8_codec(fused, CODEC["outer"]))),
        ("thinwire", "", M("stream H=30 F=3 tau=9 + int8", "streaming", "two_phase", int8, H=30, F=3, tau=9,
                           control=False, **int8_codec(fused, CODEC["outer"]))),
        ("thinwire", "sparseloco H=8", M("sparseloco H=8", "local", "all_gather", chunk, H=8, control=False,
                                         codec_bytes_per_value=CODEC["sparseloco"])),
        ("thinwire", "", M("sparseloco H=15", "local", "all_gather", chunk, H=15, control=False,
                           codec_bytes_per_value=CODEC["sparseloco"])),
        ("thinwire", "", M("sparseloco H=30", "local", "all_gather", chunk, H=30, control=False,
                           codec_bytes_per_value=CODEC["sparseloco"])),
    ]


# -- the report: python bench/netclock.py [--efficiency E] -------------------------------------
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TORCHFT_STREAM_NOTE = ("thinwire's stream H=8 F=4 tau=1 diloco-recipe's (Nesterov 0.9, lr 0.7, alpha 0.5): torchft's "
                       "streaming at S: val 2.4618534 vs thinwire's 2.4618496 (bench/results/time_to_target/"
                       "torchft_stream_peer_S160.json); its fp8's effect on quality not measured (CUDA-only)")
TTT_FILES = ("time_to_target/S160_seed0.json", "netclock_ttt_S160.json")
# rows whose steps to target are taken from another row's when they have none of their own, and why
# (said in the table)
ASSUMED = {"torch PostLocalSGD H=8": ("local H=8", "same algorithm as local H=8 (parameter average every 8 steps)"),
           "torchft DiLoCo H=8 (fp8)": ("diloco H=8", "thinwire diloco H=8's: torchft's DiLoCo at S: val 2.5850 vs "
                                                      "thinwire's 2.5862 (bench/results/time_to_target/"
                                                      "torchft_peer_S160.json)"),
           "torchft streaming H=8 F=4 tau=1 (fp8)": ("stream H=8 F=4 tau=1 diloco-recipe", TORCHFT_STREAM_NOTE)}


# rows the 4-rank time-to-target protocol runs for the clock, beyond bench/time_to_target.py's own
# (same harness: bench/quality.py's model, data, AdamW 3e-3 + wsd, 64 eval batches, seed 0)
TTT_ROWS = {
    "bf16": (1, ["comm=bf16", "sync=ddp"]),
    "co2 H=8": (8, ["sync=co2", "sync.local_steps=8"]),
    "stream H=8 F=4 tau=1": (8, ["sync=local", "sync.local_steps=8", "sync.fragments=4", "sync.fragment_delay=1",
                                 "sync.fragment_alpha=0.5", "sync.clip=inf"]),
    "stream H=8 F=4 tau=1 + int8": (8, ["sync=local", "sync.local_steps=8", "sync.fragments=4",
                                        "sync.fragment_delay=1", "sync.fragment_alpha=0.5", "sync.clip=inf",
                                        "comm=int8"]),
    "sparseloco H=8": (8, ["experiment=sparseloco", "sync.local_steps=8"]),
    "eager H=8": (8, ["sync=co2", "sync.overlap=eager", "sync.local_steps=8", "sync.outer_optim.lr=1.0",
                      "sync.outer_optim.momentum=0.0", "sync.outer_optim.nesterov=false"]),
}


def run_ttt(rows: list[str], S: int = 160) -> dict:
    """Run ``rows`` (``TTT_ROWS``) through bench/time_to_target.py's protocol (its functions;
    runs cached under its runs/) and add their branch losses to results/netclock_ttt_S<S>.json;
    the target is dense's, from time_to_target/S<S>_seed0.json."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import time_to_target as t

    for r in rows:
        if r in TTT_ROWS:
            t.ROWS[r] = TTT_ROWS[r][1]
        elif r not in t.ROWS:  # bench/time_to_target.py's own rows (its torch peers among them) run as they are
            raise SystemExit(f"--ttt: unknown row {r!r} (expected one of {', '.join([*TTT_ROWS, *t.ROWS])})")
        t.check_multiple(S, TTT_ROWS[r][0] if r in TTT_ROWS else t.H_OF.get(r, 1))
    path = os.path.join(RESULTS, f"netclock_ttt_S{S}.json")
    with open(os.path.join(RESULTS, "time_to_target", f"S{S}_seed0.json")) as fh:
        target = json.load(fh)["target"]
    doc = {"args": {"S": S, "seed": 0, "nproc": 4, "lr": 3e-3}, "target": target, "results": {}}
    if os.path.exists(path):
        with open(path) as fh:
            doc = json.load(fh)
    a = argparse.Namespace(S=S, seed=0, nproc=4, lr=3e-3, report=False, jobs=1, fs=list(t.FS))
    for r in rows:
        doc["results"][r] = {str(f): v for f, v in t.protocol(r, 0, a).items()}
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc


def ttt_table() -> str:
    """bench/time_to_target.py's table of every row in ``TTT_FILES`` (branch val losses, steps
    to target)."""
    t = _time_to_target()
    results, target, S = {}, None, None
    for name in TTT_FILES:
        path = os.path.join(RESULTS, name)
        if os.path.exists(path):
            with open(path) as fh:
                doc = json.load(fh)
            target, S = target or doc["target"], S or doc["args"]["S"]
            results.update({r: {float(f): v for f, v in losses.items()} for r, losses in doc["results"].items()})
    return t.table(results, target, argparse.Namespace(S=S, nproc=4, seed=0, lr=3e-3))


def steps_to_target() -> tuple[dict, float, int]:
    """``{protocol row: (steps / S or None, how)}``, the target and S, from the 4-rank
    time-to-target runs (bench/time_to_target.py's protocol, seed 0)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from time_to_target import steps_to_target as stt

    rows, target, S = {}, None, None
    for name in TTT_FILES:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            doc = json.load(fh)
        target = doc["target"] if target is None else target
        S = S or doc["args"]["S"]
        for row, losses in doc["results"].items():
            steps, how = stt(S, {float(f): v for f, v in losses.items()}, target)
            rows[row] = (None if steps is None else steps / S, how)
    return rows, target, S


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
            warm = _time_to_target().fair_warmup(prow, S) / S
            note += f" (first {warm:.3f} S plain DDP fp32, {fp32_step:.3g} s/step)"
        tt = (warm * fp32_step + (f - warm) * rt.step_s) / pre.compute_s if f else None
        res[m.name] = {"group": group, "H": m.H, "F": m.F, "step_s": rt.step_s, "utilisation": rt.utilisation,
                       "steps_x_S": f,
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


def _time_to_target():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import time_to_target

    return time_to_target


def _steps(f: float | None, how: str) -> str:
    if f is None:
        return how
    return f"<= {f:.2f}" if how.startswith("<=") else f"{f:.2f}"


def goals(pre: Preset, res: dict, at1: dict) -> list[str]:
    """The issue's goals at ``pre`` from its table ``res`` (and ``at1``: the table at 1 Gbit/s)."""
    ok = {True: "met", False: "**missed**"}
    tw = {k: v for k, v in res.items() if v["group"] == "thinwire" and v["ttt_over_compute_only"]}
    out = []
    if tw:
        best = min(tw, key=lambda k: tw[k]["ttt_over_compute_only"])
        b = tw[best]["ttt_over_compute_only"]
        out.append(f"- best thinwire mode to the target: {best}, {b:.2f}x the compute-only limit "
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
    opts = {"efficiency": a.efficiency, "copy_bandwidth": a.copy_bandwidth, "bucket_bytes": int(a.bucket_mb * 2 ** 20),
            "fused_efficiency": a.fused_efficiency}
    rows = methods(fused=not a.eager_only, torchft_bucket_values=int(a.torchft_bucket_mb * 2 ** 20 / 4))
    ttt, target, S = steps_to_target()
    never = ttt.get("never synchronise")
    assert never is not None and never[0] is None, f"'never synchronise' reached the target ({never}): too easy"
    md = [f"`python bench/netclock.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`: "
          f"codec at {a.efficiency:.0%} of {a.copy_bandwidth / 1e12:.1f} TB/s (eager passes)"
          f"{'' if a.eager_only else f' and {a.fused_efficiency:.0%} (the fused EF + int8 pass, comm.compile=true)'}, "
          f"DDP buckets of {a.bucket_mb:g} MB, torchft's of "
          f"{f'{a.torchft_bucket_mb:g} MB' if a.torchft_bucket_mb else 'one per fragment'}; "
          f"steps to target from the 4-rank "
          f"runs (S = {S}, target {target:.4f}, seed 0; quality at 8-64 replicas is assumed, not measured).", "",
          "Steps to target (bench/time_to_target.py's protocol; " + ", ".join(TTT_FILES) + "):", "", ttt_table(), ""]
    doc = {"efficiency": a.efficiency, "fused_efficiency": None if a.eager_only else a.fused_efficiency,
           "copy_bandwidth": a.copy_bandwidth, "S": S, "target": target, "presets": {}}
    for pre in PRESETS:
        table, res = preset_table(pre, rows, ttt, opts, S=S)
        at1 = res if pre.gbit == 1.0 else preset_table(pre, rows, ttt, opts, 1.0, S=S)[1]
        md += [f"### {pre.name}: {pre.replicas} replicas x {pre.gpus} GPU(s), {pre.tokens // 1024}K tokens/replica/step, "
               f"{pre.gbit:g} Gbit/s, {pre.latency_s * 1e3:.0f} ms; compute {pre.compute_s:.3g} s/step", "", table]
        md += goals(pre, res, at1) + [""]
        doc["presets"][pre.name] = {"table": res, "at_1gbit": at1}
    png = a.out + "_sweep.png"
    sweep_plot(rows, opts, png)
    md.append(f"![utilisation vs bandwidth]({os.path.basename(png)})")
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    with open(a.out + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
