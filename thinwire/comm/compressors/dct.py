"""Chunked DCT-II: the transform DeMo compresses its momentum in (Peng, Quesnelle, Kingma
2024, "DeMo: Decoupled Momentum Optimization", arXiv 2411.19870, Sec. 3 and Algorithm 1;
reference code ``bloc97/DeMo`` ``demo.py``: ``TransformDCT``, ``_get_smaller_split``).

A tensor is cut into tiles and every tile goes through the orthonormal DCT-II along each
of its dimensions, so the coefficients of one tile form one *chunk*; ``optim=demo`` keeps
the k largest coefficients of every chunk with :class:`~.chunked.ChunkTopKCompressor`
(the same chunk-wise Top-K, packed indices and mean over contributors as SparseLoCo),
applied to the coefficients laid out chunk after chunk.

Tiles. The tile side along a dimension of size n is the largest divisor of n that is at
most ``target`` (64): 128 -> 64, 84 -> 42, 65 -> 13, 50 -> 50, a prime above 64 -> 1
(DeMo's ``_get_smaller_split``). A 2-D (a, b) tensor is tiled (ta, tb) and has
(a/ta)(b/tb) chunks of ta*tb coefficients (the 84 x 128 embedding: 2 x 2 tiles of 42 x 64,
chunks of 2688); a 1-D tensor of n has n/t chunks of t; a tensor of more dimensions is
viewed as (shape[0], the rest) (the reference handles 1-D and 2-D only).

Transform. With D_n the orthonormal DCT-II matrix, D[k, i] = s_k cos(pi (2i + 1) k / 2n),
s_0 = sqrt(1/n), s_k = sqrt(2/n) (so D^-1 = D^T), a tile X becomes D_ta X D_tb^T (1-D: D_t x);
the inverse is D_ta^T C D_tb. The matrices are built once per size in fp64, cast to fp32
and cached per device (the reference builds them through an FFT of the identity).
Coefficients within a chunk are in row-major (tile row, tile column) order; chunks in
row-major tile order.
"""
from __future__ import annotations

import math

import torch

_BASES: dict[tuple[int, str], torch.Tensor] = {}


def smaller_split(n: int, target: int) -> int:
    """The largest divisor of ``n`` that is at most ``target`` (1 when n is a prime > target)."""
    if n <= target:
        return n
    return max(d for d in range(1, target + 1) if n % d == 0)


def dct_basis(n: int, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size n (fp32, rows = frequencies), cached."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (n, str(device))
    d = _BASES.get(key)
    if d is None:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
        d[0] *= math.sqrt(1.0 / n)
        d[1:] *= math.sqrt(2.0 / n)
        d = _BASES[key] = d.to(torch.float32).to(device)
    return d


class DCTTiles:
    """The tiling and chunked DCT of one tensor shape (see the module docstring).

    ``chunk``: coefficients per chunk (tile size); ``chunks``: tiles; ``tile``: the tile's
    side per (2-D view) dimension. ``encode(x)`` -> (chunks, chunk) fp32 coefficients;
    ``decode(c)`` -> a tensor of ``shape`` (fp32) from (chunks, chunk) or flat coefficients.
    """

    def __init__(self, shape, target: int = 64):
        self.shape = torch.Size(shape)
        numel = math.prod(self.shape)
        if len(self.shape) <= 1:
            self.view = (numel,)
        else:
            self.view = (self.shape[0], numel // self.shape[0])
        self.tile = tuple(smaller_split(n, target) for n in self.view)
        self.grid = tuple(n // t for n, t in zip(self.view, self.tile))
        self.chunk = math.prod(self.tile)
        self.chunks = math.prod(self.grid)
        self.numel = numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().reshape(self.view)
        if len(self.view) == 1:
            (t,), (g,) = self.tile, self.grid
            d = dct_basis(t, x.device)
            return x.view(g, t) @ d.T
        (ta, tb), (ga, gb) = self.tile, self.grid
        da, db = dct_basis(ta, x.device), dct_basis(tb, x.device)
        tiles = x.view(ga, ta, gb, tb).permute(0, 2, 1, 3)          # (ga, gb, ta, tb)
        return (da @ tiles @ db.T).reshape(self.chunks, self.chunk)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        c = c.float()
        if len(self.view) == 1:
            (t,), (g,) = self.tile, self.grid
            d = dct_basis(t, c.device)
            return (c.reshape(g, t) @ d).reshape(self.shape)
        (ta, tb), (ga, gb) = self.tile, self.grid
        da, db = dct_basis(ta, c.device), dct_basis(tb, c.device)
        tiles = da.T @ c.reshape(ga, gb, ta, tb) @ db                 # (ga, gb, ta, tb)
        return tiles.permute(0, 2, 1, 3).reshape(self.shape)

    def __repr__(self) -> str:
        return f"DCTTiles(shape={tuple(self.shape)}, tile={self.tile}, chunks={self.chunks})"
