"""Streaming fragments for ``sync=local`` (Douillard et al. 2025, "Streaming DiLoCo with
overlapping communication", arXiv 2501.18512; torchft's ``DiLoCo`` with ``fragment_sync_delay``
and ``fragment_update_alpha``).

The model's blocks are split into F fragments, *strided* (fragment j holds blocks j, j + F,
j + 2F, ...: the paper's Sec. 2.2 prefers strided to sequential fragments). Every fragment
is synchronised once per round of H inner steps, at staggered steps: fragment j's all-reduce
is launched at step ``o_j - tau`` of the round and consumed at ``o_j``, with
``o_j = (j + 1) H / F`` (mod H, so the last fragment closes the round), as torchft places
its fragments. At the consuming step (paper Alg. 1, outer step on fragment p)::

    theta_p = OuterOpt(theta_p, mean_i Delta_{i,p})        the fragment's anchor (same on every rank)
    w_{i,p} = alpha * w_{i,p} + (1 - alpha) * theta_p      merge: the rank's tau steps of progress
                                                           on p are kept with weight alpha

with ``Delta_{i,p} = theta_p - w_{i,p}`` taken at the launch, tau steps earlier. Requires
H % F == 0 and tau < H / F (one fragment's all-reduce finishes before that fragment, or any
other, is launched again: at most one is in flight), as torchft's DiLoCo does. With F = 1,
tau = 0 and alpha = 0 this is ``sync=local`` exactly.

Blocks: a parameter's block is its name up to the first all-digit component
(``blocks.3.attn.qkv.weight`` -> ``blocks.3``); parameters outside every block (embeddings,
final norm, head) are dealt out to the fragments in the same strided way, in model order.
A departure from the paper, which fragments only transformer blocks: the rest has to
synchronise somewhere, and spreading it keeps the fragments' sizes close.
"""
from __future__ import annotations

from ..errors import ConfigError


def block_of(name: str) -> str | None:
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k + 1])
    return None


def strided_fragments(names: list[str], n: int) -> list[list[int]]:
    """Piece indices of each of the ``n`` fragments: block b (in order of first appearance)
    goes to fragment b % n, the k-th piece outside any block to fragment k % n. Raises a
    ConfigError when there are fewer blocks than fragments."""
    blocks: dict[str, int] = {}
    loose = 0
    out: list[list[int]] = [[] for _ in range(n)]
    for i, name in enumerate(names):
        b = block_of(name)
        if b is None:
            out[loose % n].append(i)
            loose += 1
        else:
            out[blocks.setdefault(b, len(blocks)) % n].append(i)
    if n > 1 and len(blocks) < n:
        raise ConfigError(f"sync.fragments={n}: the model has {len(blocks)} blocks; at most one fragment per block")
    return out


class FragmentSchedule:
    """When each fragment is launched and consumed, for 1-based step ``s``."""

    def __init__(self, H: int, F: int, tau: int):
        self.H, self.F, self.tau = H, F, tau
        offsets = [((j + 1) * H // F) % H for j in range(F)]
        self.consume = {o: j for j, o in enumerate(offsets)}
        self.launch = {(o - tau) % H: j for j, o in enumerate(offsets)}

    def launched_at(self, s: int) -> int | None:
        return self.launch.get(s % self.H)

    def consumed_at(self, s: int) -> int | None:
        return self.consume.get(s % self.H)
