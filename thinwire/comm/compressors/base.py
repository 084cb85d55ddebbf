"""Shared pieces of every compressor: the payload, the base class, seeding, bit packing.

A compressor is a pure function pair ``compress(t) -> Payload`` / ``decompress(p) -> t'``
plus a seed.  The :class:`Payload` holds exactly the tensors that cross the wire; its
``nbytes`` is the sum of their real sizes and nothing else.  Side information that every
rank already knows without communication (the original shape and dtype, the random
step of rand-k) travels in ``Payload.shape/dtype/meta`` and is never charged: the
receiving rank reconstructs it from its own payload of the same call (all ranks
compress tensors of the same shape in the same order).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

_MASK63 = (1 << 63) - 1


@dataclass
class Payload:
    """What one ``compress`` call puts on the wire.

    ``tensors``: the wire tensors in a fixed order (1-D, contiguous).  ``shape``/``dtype``:
    of the tensor that was compressed.  ``meta``: side information known to every rank
    without communication (e.g. rand-k's ``step``); never sent, never counted.
    """

    tensors: dict[str, torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes this payload puts on the wire: the sum of its tensors' real sizes."""
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def mix_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): a well-spread 63-bit generator seed, identical on every
    rank and every platform (Python's ``hash`` is not used on purpose)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


def generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(seed, step))
    return g


_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor 8 per byte (MSB first) into ceil(n/8) uint8."""
    n = bits.numel()
    pad = (-n) % 8
    b = bits.to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    shifts = _SHIFTS.to(b.device)
    return (b.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor."""
    shifts = _SHIFTS.to(packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


def uint_width(count: int) -> int:
    """Bits needed to write any integer in [0, count): ceil(log2(count)), at least 1."""
    return max(1, (int(count) - 1).bit_length())


def _grouping(width: int) -> tuple[int, int]:
    """(values per group, bytes per group): the smallest run of ``width``-bit values that
    fills whole bytes (lcm(width, 8) bits), e.g. 2 values in 3 bytes for 12 bits."""
    per = 8 // math.gcd(width, 8)
    return per, width * per // 8


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a 1-D tensor of integers in [0, 2**width) into ceil(n * width / 8) uint8: the
    values' bits back to back, each value MSB first, zero bits after the last one (so
    ``pack_uint(b, 1) == pack_bits(b)``). Runs of values that fill whole bytes (2 values
    of 12 bits in 3 bytes) go through one int64 word each when that word fits 56 bits;
    other widths through a (n, width) bit matrix. Vectorised; no loop over values."""
    if not 1 <= width <= 32:
        raise ValueError(f"pack_uint: width={width} must be in [1, 32]")
    n = values.numel()
    nbytes = (n * width + 7) // 8
    if width == 8:
        return values.reshape(-1).to(torch.uint8)
    per, size = _grouping(width)
    if size > 7:  # the group would not fit an int64 word: one row of bits per value
        shifts = torch.arange(width - 1, -1, -1, device=values.device, dtype=torch.int64)
        bits = (values.reshape(-1, 1).long() >> shifts) & 1
        return pack_bits(bits.reshape(-1).bool())
    v = values.reshape(-1).long()
    pad = (-n) % per
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.view(-1, per)
    word = v[:, 0]
    for j in range(1, per):
        word = (word << width) | v[:, j]
    out = torch.stack([(word >> (8 * (size - 1 - i))) & 0xFF for i in range(size)], dim=1)
    return out.reshape(-1)[:nbytes].to(torch.uint8)


def unpack_uint(packed: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: the first ``n`` values, as int64."""
    if width == 8:
        return packed[:n].long()
    per, size = _grouping(width)
    if size > 7:
        bits = unpack_bits(packed, n * width).view(n, width).long()
        shifts = torch.arange(width - 1, -1, -1, device=packed.device, dtype=torch.int64)
        return (bits << shifts).sum(dim=1)
    b = packed.long()
    pad = (-b.numel()) % size
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, size)
    word = b[:, 0]
    for i in range(1, size):
        word = (word << 8) | b[:, i]
    mask = (1 << width) - 1
    vals = torch.stack([(word >> (width * (per - 1 - j))) & mask for j in range(per)], dim=1)
    return vals.reshape(-1)[:n]


MAX_BLOCK_SIZE = 1 << 24  # every tensor is zero-padded to whole blocks: 64 MiB of fp32 each at most


def check_block_size(name: str, block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 8 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"{name}: block_size={block_size!r} must be an int in [8, {MAX_BLOCK_SIZE}] "
                         f"(each tensor is padded to whole blocks)")
    return block_size


def check_ratio(name: str, ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise ValueError(f"{name}: ratio={ratio!r} must be a number in (0, 1]")
    return float(ratio)


def check_bool(name: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {key}={value!r} must be true or false")
    return value


def check_choice(name: str, key: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: {key}={value} must be one of {', '.join(sorted(choices))}")
    return value


def blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 view of ``flat`` as (nblocks, block_size), zero-padded at the end."""
    n = flat.numel()
    pad = (-n) % block_size
    x = flat.float()
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block_size)


class Compressor(ABC):
    """Base class.  Subclasses set ``name`` and the algebra flags the collective reads:

    * ``summable``: payloads of different ranks add elementwise in the compressed domain
      and ``decompress`` is linear, so an all-reduce of the payload is exact;
    * ``sparse``: (values, indices) payloads of a fixed size, aggregated by all-gather
      plus scatter-add;
    * otherwise quantised: aggregated by the two-phase collective.

    ``server_error_default``: whether the two-phase collective should keep an error buffer
    on the chunk owner by default (1-bit Adam keeps one; essential for scaled sign).

    ``contributors_mean`` (an instance option, False here): the sparse all-gather divides each
    coordinate by the number of ranks that sent it instead of by the group size; ``accumulate``
    then takes ``counts`` (chunk_topk's ``mean=contributors``).

    Randomness.  ``compress(t, step=k)`` draws from a generator seeded by
    ``mix_seed(seed, k)``; with ``step=None`` the compressor's own call counter is used
    and then incremented (``set_step(k)`` sets it).  All ranks that must agree (rand-k
    indices) must therefore pass the same ``step`` - e.g. the hook passes
    ``iteration * n_buckets + bucket_position`` - or make the same sequence of calls.
    Deterministic compressors accept and ignore ``step``.
    """

    name: ClassVar[str] = "base"
    summable: ClassVar[bool] = False
    sparse: ClassVar[bool] = False
    server_error_default: ClassVar[bool] = False
    contributors_mean: bool = False

    @classmethod
    def check_options(cls, options) -> None:
        """Options are checked by building the compressor (``__init__`` raises ValueError)."""
        cls(**{k: v for k, v in vars(options).items() if not k.startswith("_")})

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{self.name}: seed={seed!r} must be an int")
        self.seed = seed
        self._step = 0

    def set_step(self, step: int) -> None:
        """Set the call counter used when ``compress`` gets no explicit ``step``."""
        self._step = int(step)

    def _take_step(self, step: int | None) -> int:
        if step is not None:
            return int(step)
        s = self._step
        self._step += 1
        return s

    def compress(self, t: torch.Tensor, *, step: int | None = None) -> Payload:
        self._check_input(t)
        return self._compress(t.detach().reshape(-1), t.shape, t.dtype, self._take_step(step))

    def decompress(self, p: Payload) -> torch.Tensor:
        return self._decompress(p).to(p.dtype).reshape(p.shape)

    def accumulate(self, p: Payload, out: torch.Tensor) -> torch.Tensor:
        """``out += decompress(p)`` on a flat fp32 ``out``; sparse compressors scatter-add."""
        return out.add_(self._decompress(p).reshape(-1).float())

    # subclasses implement these on the flattened tensor
    @abstractmethod
    def _compress(self, flat, shape, dtype, step) -> Payload:
        """The payload of the flattened tensor ``flat`` (of ``shape``/``dtype``) at ``step``."""

    @abstractmethod
    def _decompress(self, p: Payload) -> torch.Tensor:
        """The flat fp32 tensor that payload ``p`` stands for."""

    def _check_input(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t))}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"
