"""The network clock's user-scale projections: the issue's presets (1B, 7B, 70B), how a
method puts a model of N parameters on the wire (``Method``: its calls and codec bytes), one
round of it at a preset (``project``, on bench/harness/netclock_model.py's clock), and the projected
rows: DDP, its peers (bf16, torch PowerSGD and PostLocalSGD, torchft DiLoCo and streaming)
and thinwire's modes (``methods``).

Projections (``project``): the issue's presets, bytes from the accounting formulas at the
preset's p and N (``bucket_calls``), DDP's 25 MB buckets of fp32 gradients, the compressors'
own bytes per value (``payload_bytes_per_value``). PowerSGD (Vogels et al. 2019, arXiv
1905.13727) sends P and Q of rank r per matrix: (n + m) r values, with n, m from a GPT's
shapes (``Preset.d_model``, ``layers``). torchft's fp8 all-reduce is counted at 1 B/value.
SparseLoCo's rows (``Method.exchange``) take their bytes per parameter from
bench/exchange_bytes.py (the accounting's formulas: the sparse all-gather, or the run-aligned
two_phase's busiest rank, ``ownership.two_phase_bytes``, at the preset's p) over a LLaMA
layout of the preset's shapes (``shapes``), times the preset's N (``sparse_exchange``).

A replica of several GPUs is one island (``Preset.engine``): thinwire's ``engine=fsdp2`` with
``engine.shard_group_size`` = its GPUs (HSDP, docs/fsdp2.md); p is the number of islands and
the replica's link carries the whole exchange (the island's GPUs each send the exchange of
their local shards, together the model's). Traffic inside an island is charged on the
island's own link (``island_calls``: per FSDP2 unit, a layer or the root, an all-gather of
each GPU's shard in bf16 in forward and again in backward, and a reduce-scatter of the fp32
gradient; ``island_exposed`` in bench/harness/netclock_model.py says how much of it compute
hides), at ``island_gbyte`` GB/s per GPU and direction (default NVLink 4's 450) and
``island_latency_s`` per message (default 5 us, assumed). Every method pays it every step.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

from .netclock_model import Call, Link, RoundTime, island_exposed, round_time


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
# the link inside an island (a replica's GPUs): H100 SXM's NVLink 4, 900 GB/s both ways = 450 GB/s per
# direction (NVIDIA's spec; NCCL's achieved bus bandwidth is lower: a parameter, --island-gbyte); the
# per-message latency is an assumption (--island-latency-us), not a measurement
ISLAND_GBYTE = 450.0
ISLAND_LATENCY_S = 5e-6


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
    ffn: int = 0         # LLaMA layout (``shapes``): MLP width, 0: LLaMA's 8d/3 rounded up to 256
    kv_dim: int = 0      # width of the K and V projections (grouped-query attention), 0: d_model
    # FSDP2's mixed precision inside an island: gathers in bf16, gradients reduced in fp32 (torchtitan's
    # defaults, torchtitan/config/job_config.py: mixed_precision_param, mixed_precision_reduce)
    param_bytes: int = 2
    reduce_bytes: int = 4

    @property
    def engine(self) -> str:
        """thinwire's engine for one replica of ``gpus`` GPUs (module docstring)."""
        return "ddp" if self.gpus == 1 else (f"fsdp2, engine.shard_group_size={self.gpus} engine.param_dtype=bf16 "
                                             f"engine.reduce_dtype=fp32 (HSDP)")

    @property
    def compute_s(self) -> float:
        """6 N tokens / (GPUs x 989e12 x 0.40): the issue's compute per step."""
        return 6 * self.params * self.tokens / (self.gpus * H100_BF16_PEAK * MFU)


PRESETS = (
    Preset("1B", 1e9, 8, 1, 64 * 1024, 1.0, 0.020, 2048, 20),
    Preset("7B", 7e9, 32, 8, 512 * 1024, 10.0, 0.020, 4096, 32),
    Preset("70B", 70e9, 64, 8, 1024 * 1024, 1.0, 0.050, 8192, 80, ffn=28672, kv_dim=1024),  # LLaMA-2-70B's
)
VOCAB = 32000  # LLaMA's


def shapes(pre: Preset) -> list[tuple[str, int]]:
    """``(name, numel)`` of every tensor of a LLaMA-layout model (Touvron et al. 2023, arXiv
    2302.13971: untied embedding and output, per layer q, k, v, o, three MLP matrices and two
    norms; a final norm) at the preset's d_model and layers: at 7B exactly LLaMA-7B's 6.74e9
    (bench/exchange_bytes.py's ``llama7b_params``), at 70B LLaMA-2-70B's 6.90e10 (grouped K, V of
    1024), at 1B 1.16e9 (d 2048, MLP 5632, 20 layers). The names decide two_phase's owners."""
    d, kv = pre.d_model, pre.kv_dim or pre.d_model
    f = pre.ffn or -(-(8 * d // 3) // 256) * 256
    out = [("tok_embeddings.weight", VOCAB * d), ("output.weight", VOCAB * d), ("norm.weight", d)]
    for i in range(pre.layers):
        out += [(f"layers.{i}.attention.w{x}.weight", d * (kv if x in "kv" else d)) for x in "qkvo"]
        out += [(f"layers.{i}.feed_forward.w{x}.weight", d * f) for x in "123"]
        out += [(f"layers.{i}.{x}_norm.weight", d) for x in ("attention", "ffn")]
    return out


def fsdp_units(pre: Preset) -> list[int]:
    """Parameters of each FSDP2 unit in forward order at the preset's N (``shapes`` scaled to
    ``pre.params``): the root first (embeddings, output, final norm: its all-gather opens the
    forward), then one unit per layer, as ``engine=fsdp2`` wraps a model."""
    by_unit: dict[str, int] = {}
    for name, n in shapes(pre):
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        by_unit[unit] = by_unit.get(unit, 0) + n
    scale = pre.params / sum(by_unit.values())
    return [round(n * scale) for n in by_unit.values()]


def island_calls(pre: Preset) -> tuple[list[Call], list[Call]]:
    """One step's calls inside an island of ``pre.gpus`` GPUs (none for one GPU): forward's
    all-gathers (each GPU's shard of each unit, ``param_bytes`` per value), then backward's
    all-gather and reduce-scatter (``reduce_bytes`` per value) of each unit in reverse order;
    bytes by the accounting's formulas at p = S (thinwire.trainer.fsdp2_engine.island_step_bytes
    charges the same per parameter: S - 1 shards gathered, (S - 1) / S of the gradient scattered)."""
    S = pre.gpus
    if S == 1:
        return [], []
    forward, backward = [], []
    for n in fsdp_units(pre):
        shard = math.ceil(n / S)
        forward.append(Call("all_gather", "island", _cb("all_gather", shard * pre.param_bytes, S), S))
    for n in reversed(fsdp_units(pre)):
        shard = math.ceil(n / S)
        backward += [Call("all_gather", "island", _cb("all_gather", shard * pre.param_bytes, S), S),
                     Call("reduce_scatter", "island", _cb("reduce_scatter", shard * S * pre.reduce_bytes, S), S)]
    return forward, backward


@functools.lru_cache(maxsize=None)
def island_step_s(pre: Preset, island_gbyte: float = ISLAND_GBYTE, island_latency_s: float = ISLAND_LATENCY_S) -> float:
    """Exposed seconds per step of the traffic inside one of the preset's islands."""
    forward, backward = island_calls(pre)
    return island_exposed(Link(island_gbyte * 8, island_latency_s), forward, backward, pre.compute_s)


def exchange_bytes_module():
    """bench/exchange_bytes.py, imported as ``bench.exchange_bytes`` (tests) or, from the CLI
    (run from bench/), as ``exchange_bytes``."""
    return importlib.import_module("bench.exchange_bytes" if __package__.startswith("bench.") else "exchange_bytes")


EXCHANGES = ("allgather", "two_phase")   # bench/exchange_bytes.py's "sparseloco <exchange>"
SPARSELOCO_MIN_NUMEL = 4096   # configs/comm/chunk_topk.yaml's comm.min_numel (bench/exchange_bytes.py's)


@functools.lru_cache(maxsize=None)
def sparse_exchange(pre: Preset, exchange: str, p: int | None = None) -> tuple[int, int]:
    """Bytes one rank (two_phase: the busiest) sends in one SparseLoCo exchange at the preset's
    N and p (or ``p``): ``(sparse, dense)``, the chunk_topk collective's and the fp32 all-reduce
    of the tensors below comm.min_numel, from bench/exchange_bytes.py at ``shapes(pre)``, per
    parameter times ``pre.params``."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}: expected one of {', '.join(EXCHANGES)}")
    eb, params = exchange_bytes_module(), shapes(pre)
    p = pre.replicas if p is None else p
    small = [(n, k) for n, k in params if k < SPARSELOCO_MIN_NUMEL]
    total, dense = (eb.exchange_bytes(ps, f"sparseloco {exchange}", p) for ps in (params, small))
    scale = pre.params / sum(k for _, k in params)
    return round((total - dense) * scale), round(dense * scale)


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
    owner_bytes_per_value: float = 0.0  # two_phase's sparse owner: bytes its passes touch per value it owns
    exchange: str = ""       # SparseLoCo's rows: "allgather" | "two_phase" (``sparse_exchange``; not bytes_per_value)


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
    if m.exchange:
        if m.F != 1 or m.sync == "ddp":
            raise ValueError(f"{m.name}: exchange={m.exchange!r} is one outer exchange per round (F=1, not sync=ddp)")
        return [sparse_calls(m.exchange, pre)]
    if m.sync == "ddp":
        B = max(1, math.ceil(N * 4 / bucket_bytes))
        return [bucket_calls(m, N // B, p, pre)] * B
    n = N // m.F
    k = max(1, math.ceil(n / m.bucket_values)) if m.bucket_values else 1
    return [bucket_calls(m, n // k, p, pre) * k] * m.F


def sparse_calls(exchange: str, pre: Preset) -> list[Call]:
    """One SparseLoCo exchange at ``pre`` as the aggregator launches it: the chunk_topk
    collective (all-gather; or two_phase's two alltoallv phases, p - 1 hops each, charged half
    the busiest rank's bytes each: equal for balanced owners, and the clock's rules read only
    their sum) and the fp32 all-reduce of the small tensors, on the same group."""
    p = pre.replicas
    sparse, dense = sparse_exchange(pre, exchange, p)
    ar = [Call("all_reduce", "data", dense, p)] if dense else []
    if exchange == "allgather":
        return [Call("all_gather", "data", sparse, p), *ar]
    return [Call("all_to_all", "data", sparse // 2, p), Call("all_to_all", "data", sparse - sparse // 2, p), *ar]


def project(m: Method, pre: Preset, gbit: float | None = None, efficiency: float = PASS_EFFICIENCY,
            copy_bandwidth: float = COPY_BANDWIDTH, bucket_bytes: int = BUCKET_BYTES,
            fused_efficiency: float = FUSED_EFFICIENCY, island_gbyte: float = ISLAND_GBYTE,
            island_latency_s: float = ISLAND_LATENCY_S) -> RoundTime:
    """One round of ``m`` at ``pre`` (optionally at another bandwidth; ``gbit`` is the link
    between replicas, ``island_gbyte`` the one inside a replica of several GPUs)."""
    p, N = pre.replicas, int(pre.params)
    link = Link(gbit or pre.gbit, pre.latency_s)
    codec = N / pre.gpus * (m.codec_bytes_per_value / efficiency + m.fused_bytes_per_value / fused_efficiency) \
        / copy_bandwidth  # sharded over the replica's GPUs
    codec += N / pre.gpus / p * m.owner_bytes_per_value / efficiency / copy_bandwidth  # on the owner's 1/p
    if m.sync == "ddp":  # thinwire's per-step loss / non-finite agreement
        control = [Call("all_reduce", "control", _cb("all_reduce", CONTROL, p), p)] if m.control else []
    else:  # the outer step's non-finite flag, once per round
        control = [Call("all_reduce", "control", _cb("all_reduce", 4, p), p)]
    data = data_calls(m, pre, bucket_bytes)
    return round_time(m.sync, link, pre.compute_s, data, control, m.H, m.tau, codec,
                      island_step_s(pre, island_gbyte, island_latency_s))


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
#   sparse two_phase (SparseLoCo, top-k), per value of the owner's 1/p: sum received 4+4,
#   + owner residual 4+4+4, (chunk) top-k 8, new residual 8                         36
#   torchft fp8: + quantise 5, dequantise 5; PowerSGD: M Q and M^T P read M twice (8),
#   EF 24, P Q^T 4
#   int8 with the fused EF + int8 pass (comm.compile=true on CUDA): that pass at its floor, 18
#   (docs/gpu.md), and eager the owner's dequantise-and-sum 1+4 and the final dequantise 1+4   10
CODEC = {"bf16": 12, "int8_ef": 24 + 15, "topk_ef": 24 + 20, "outer": 40, "co2": 48, "sparseloco": 40 + 32,
         "torchft_fp8": 50, "powersgd": 36, "int8_rest": 10, "sparse_owner": 36}
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
        ("thinwire", "", M("topk 1% + ef two_phase", "ddp", "two_phase", topk, codec_bytes_per_value=CODEC["topk_ef"],
                           owner_bytes_per_value=CODEC["sparse_owner"])),
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
        ("thinwire", "sparseloco H=8", M("sparseloco H=8 all-gather", "local", "all_gather", chunk, H=8, control=False,
                                         codec_bytes_per_value=CODEC["sparseloco"], exchange="allgather")),
        ("thinwire", "", M("sparseloco H=15 all-gather", "local", "all_gather", chunk, H=15, control=False,
                           codec_bytes_per_value=CODEC["sparseloco"], exchange="allgather")),
        *[("thinwire", "", M(f"sparseloco H={h} two_phase", "local", "two_phase", chunk, H=h, control=False,
                             codec_bytes_per_value=CODEC["sparseloco"], owner_bytes_per_value=CODEC["sparse_owner"],
                             exchange="two_phase")) for h in (8, 15, 30)],
    ]
