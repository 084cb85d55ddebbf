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

The rounds themselves run in :class:`FragmentStreaming`, the part of ``sync=local``
(``thinwire.comm.local.LocalUpdates``) that launches, waits for and merges fragments.
"""
from __future__ import annotations

import time

import torch

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


class FragmentStreaming:
    """Streaming rounds, mixed into ``thinwire.comm.local.LocalUpdates``: at most one
    fragment's mean in flight (``pending``); ``stream_step`` runs every step of a streaming
    round. Uses the host's space, anchor, outer optimizer, averager, ``H``, ``round``,
    ``skipped``, ``moments``, ``finite_everywhere`` and ``metrics``."""

    def init_streaming(self, fragments: int, delay: int, alpha: float) -> None:
        """``sync.fragments``/``fragment_delay``/``fragment_alpha``; streaming if F > 1 or tau > 0."""
        self.streaming = fragments > 1 or delay > 0
        if self.streaming:
            self.fragments = strided_fragments(self.space.names, fragments)
            self.schedule = FragmentSchedule(self.H, fragments, delay)
            self.alpha = alpha
        self.pending: int | None = None                    # the fragment in flight
        self.pending_future: torch.futures.Future | None = None
        self.pending_mean: torch.Tensor | None = None      # its mean, once waited for

    def _fragment(self, flat: torch.Tensor, j: int) -> torch.Tensor:
        pieces = self.space.split(flat)
        return torch.cat([pieces[i].reshape(-1) for i in self.fragments[j]])

    def _complete_fragment(self) -> float:
        if self.pending_future is None:
            return 0.0
        t0 = time.perf_counter()
        self.pending_mean = self.pending_future.wait()
        self.averager.commit()
        self.pending_future = None
        return time.perf_counter() - t0

    def _merge_fragment(self, j: int) -> None:
        """Outer step on fragment j's anchor with its mean; w = alpha w + (1 - alpha) anchor."""
        idx = self.fragments[j]
        mean = [x.clone() for x in self.pending_mean.split([self.space.sizes[i] for i in idx])]
        anchor = [self.anchor[i] for i in idx]
        self.outer.step(anchor, [x.view_as(a) for x, a in zip(mean, anchor)])
        live = self.space.read_flat()
        pieces = self.space.split(live)
        for i in idx:
            if self.alpha == 0:
                pieces[i].copy_(self.anchor[i].reshape(pieces[i].shape))
            else:
                pieces[i].mul_(self.alpha).add_(self.anchor[i].reshape(pieces[i].shape), alpha=1 - self.alpha)
        self.space.write_flat(live)
        self.pending, self.pending_mean = None, None

    def stream_step(self, step: int) -> dict[str, float]:
        """After every step: consume the fragment due here, launch the one that starts here
        (module doc); the last step of a round closes it."""
        s = step + 1
        wait, out = 0.0, {}
        j = self.schedule.consumed_at(s)
        if j is not None and self.pending == j:
            wait += self._complete_fragment()
            self._merge_fragment(j)
        j = self.schedule.launched_at(s)
        if j is not None:
            t0 = time.perf_counter()
            idx = self.fragments[j]
            delta = self._fragment(self.space.flat(self.anchor), j) - self._fragment(self.space.read_flat(), j)
            if self.finite_everywhere(delta):
                self.pending = j
                self.pending_future = self.averager.average_async(
                    [self.space.names[i] for i in idx], [self.space.sizes[i] for i in idx], delta, self.round)
                if self.schedule.consumed_at(s) == j:  # tau = 0: consumed where launched
                    self._complete_fragment()
                    self._merge_fragment(j)
            else:  # a non-finite fragment somewhere: every rank restarts it from its anchor
                live = self.space.read_flat()
                pieces = self.space.split(live)
                for i in idx:
                    pieces[i].copy_(self.anchor[i].reshape(pieces[i].shape))
                self.space.write_flat(live)
                self.skipped += 1
            wait += time.perf_counter() - t0
            out["fragment"] = j
        if s % self.H:
            return {**out, "comm_wait_s": wait, **self.averager.take_stats()} if out else {}
        self.round += 1
        self.moments.after_round(self.round)
        return self.metrics(wait, **out, **self.averager.take_stats())

