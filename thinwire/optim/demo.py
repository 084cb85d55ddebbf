"""``optim=demo``: Decoupled Momentum Optimization (Peng, Quesnelle, Kingma 2024, arXiv
2411.19870, Algorithm 1; reference code ``bloc97/DeMo`` ``demo.py``; the production
variant is Psyche's DisTrO, ``PsycheFoundation/psyche`` ``shared/modeling/src/distro.rs``).

Every step, on every rank, for every trainable tensor (no DDP gradient all-reduce: the
plugin owns its exchange, like ``optim=zo_dist``)::

    p <- p (1 - lr wd)                 decoupled weight decay (matrices only, thinwire's grouping)
    m <- beta m + lr g                 beta = optim.beta (0.999; DisTrO 0.995)
    C <- DCT(m)                        chunked DCT-II (thinwire.comm.compressors.dct: tiles of
                                       the largest divisor <= optim.chunk per dimension)
    S <- top-k |C| of every chunk      k = optim.k (32 of 4096; DisTrO 4)
    m <- m - IDCT(S)                   S at full precision, whatever goes on the wire: the
                                       momentum is the error feedback (with 1-bit values the
                                       magnitude is dropped, not fed back, as Psyche does)
    all-gather every rank's S          indices packed in ceil(log2 chunk) bits, values as
                                       bf16 (optim.bits=16) or one sign bit decoded as +-1
                                       (optim.bits=1, DisTrO), one accounted all-gather per step
    Q <- per coefficient, the mean over the ranks that sent it (in rank order: the same
         bytes summed in the same order on every rank, so Q is bitwise equal everywhere)
    U <- IDCT(Q)
    p <- p - lr sign(U)                Signum (optim.update_rule=sign, the paper's)
      or AdamW(p, grad=U)              optim.update_rule=adamw (DeMo's "v2": U fed to the base optimizer)

The Top-K, the index packing, the value encodings and the mean over contributors are
``comm=chunk_topk``'s (:class:`~thinwire.comm.compressors.chunked.ChunkTopKCompressor` on
the coefficients laid out chunk after chunk, :func:`~thinwire.comm.collectives.sparse_mean`).
A tensor whose chunk is no larger than k (k >= chunk) travels without indices: every
coefficient, averaged over all ranks.

Bytes a rank puts on the wire per step (payload), per tensor with c chunks of C
coefficients and k' = min(k, C) kept: c k' ceil(log2 C) / 8 rounded up (indices) +
c k' x 2 (bf16) or c k' / 8 rounded up (signs); the all-gather sends (p - 1) x the sum
over tensors. At C = 4096, k = 32, bf16: 32 x 28 bits per 4096 = 0.0273 B/param.

The momentum is kept as its DCT coefficients M = DCT(m) (an orthonormal change of basis,
so the algorithm is the same): M <- beta M + lr DCT(g), and m - IDCT(S) is M with the sent
coefficients set to 0, exactly. One forward and one inverse transform per tensor per step
(the reference: one forward, two inverse).

State (``state_dict``): the momentum M of this rank, as (chunks, chunk) coefficients (it differs between ranks, so the
checkpoint keeps it per rank: ``per_rank_state``) and, for ``update_rule=adamw``, the AdamW
state; a skipped (non-finite) step never reaches ``apply``, so nothing changes. DeMo's
reference keeps its state outside ``state_dict`` and sends int64 indices.

Gradient clipping (``optim.grad_clip``) is per rank, on the local gradient, before it
enters the momentum (there is no averaged gradient to clip).

Under ``engine=fsdp2`` (``update_rule=sign``, no overlap) each rank runs the above on its
local shards (FSDP2's island mean of the gradient) and all-gathers over the replicate group
(``exchange_over``): the DCT tiles are those of the local shard's shape, so a shard's
coefficients are the unsharded tensor's exactly when its rows are a whole number of tiles of
the same side (tested bitwise at 2x2 on such a model); otherwise the tiling, and so the
update, is per shard. Its momentum is then checkpointed per rank by the engine (same layout).

``optim.overlap=true`` (Signum only): Psyche's look-ahead. Step t's all-gather runs on the
world's second process group during step t + 1's forward/backward, which is taken at this
rank's look-ahead x - lr_t sign(m_t); U_t is applied (with step t's decay and LR) when step
t + 1 updates, and the last step applies its own update at once. Exactly what is applied when,
and where it departs from Psyche: :mod:`thinwire.optim.demo_overlap`. Bytes are unchanged.
The metrics carry ``gather_s`` (launch to arrival of the gather) and ``gather_wait_s`` (time
blocked waiting for it), so 1 - wait / gather is the fraction of the gather hidden.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..comm import accounting
from ..comm.collectives import pack, sparse_mean, unpack
from ..comm.compressors.base import Payload, pack_bits, unpack_bits
from ..comm.futures import then
from ..comm.compressors.chunked import ChunkTopKCompressor
from ..comm.compressors.dct import DCTTiles
from ..errors import need, one_of, positive
from ..tensors import local_shard
from .demo_overlap import Gather, Lookahead
from .plugins import OPTIMIZERS, BackpropOptions, OwnUpdatePlugin


@dataclass
class DeMoOptions(BackpropOptions):
    grad_clip: float = 1.0           # per rank, on the local gradient before the momentum; 0 = off
    beta: float = 0.999              # momentum decay (DeMo's compression_decay; DisTrO 0.995)
    k: int = 32                      # DCT coefficients kept per chunk
    chunk: int = 64                  # target tile side per dimension (largest divisor <= chunk)
    bits: int = 16                   # 16: bf16 values | 1: sign bits decoded as +-1 (DisTrO)
    update_rule: str = "sign"        # sign (Signum, DeMo) | adamw (U fed to AdamW: DeMo v2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])   # update_rule=adamw only
    eps: float = 1e-8                # update_rule=adamw only
    overlap: bool = False            # Psyche's look-ahead: the gather runs during the next step's forward/backward

    def check(self) -> None:
        super().check()
        need(0 <= self.beta < 1, "beta", self.beta, "must be in [0, 1)")
        positive(self, "k", "chunk")
        need(self.bits in (1, 16), "bits", self.bits, "must be 16 (bf16 values) or 1 (sign bits)")
        one_of(self.update_rule, ("sign", "adamw"), "update_rule")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
             "must be two numbers in [0, 1)")
        positive(self, "eps")
        need(not (self.overlap and self.update_rule != "sign"), "overlap", self.overlap,
             f"needs update_rule=sign (the look-ahead is a Signum step; not {self.update_rule})")


class _DenseCoefficients:
    """A tensor whose chunks are no larger than k: all coefficients, no indices, values
    bf16 or sign bits, mean over all ranks (every rank sends every coefficient)."""

    def __init__(self, bits: int):
        self.bits = bits

    def compress(self, c: torch.Tensor) -> Payload:
        flat = c.reshape(-1)
        t = {"values": flat.to(torch.bfloat16)} if self.bits == 16 else {"signs": pack_bits(flat < 0)}
        return Payload(t, flat.shape, torch.float32)

    def values(self, p: Payload) -> torch.Tensor:
        if self.bits == 16:
            return p.tensors["values"].float()
        return 1.0 - 2.0 * unpack_bits(p.tensors["signs"], p.numel).float()

    def mean(self, payloads: list[Payload], numel: int, device) -> torch.Tensor:
        acc = torch.zeros(numel, dtype=torch.float32, device=device)
        for pl in payloads:
            acc.add_(self.values(pl))
        return acc.div_(len(payloads))


@OPTIMIZERS.register("demo")
class DeMoPlugin(OwnUpdatePlugin):
    """``optim=demo``: see the module docstring."""

    Config = DeMoOptions
    needs_grad_allreduce = False     # the plugin exchanges compressed momentum itself
    per_rank_state = True            # the momentum (error feedback) differs between ranks
    exchanges_on_shards = True       # runs on local shards, exchanging over the groups given (exchange_over)

    @staticmethod
    def shard_refusal(cfg) -> tuple | None:
        """(key, value, why) of an option that cannot run on local shards, else None."""
        if cfg.update_rule != "sign":
            return "optim.update_rule", cfg.update_rule, "on local shards DeMo runs update_rule=sign only"
        if cfg.overlap:
            return "optim.overlap", cfg.overlap, "the look-ahead is not built for local shards"
        return None

    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        self.world_size = self.world.world_size if self.world is not None else 1
        self.group = None  # the exchange's group (None: the world; exchange_over)
        self.meter = self.meter if self.meter is not None else accounting.WireMeter()
        self.tiles = [DCTTiles(local_shard(p).shape, cfg.chunk) for p in self.params]
        self.coders: list = []
        for t in self.tiles:
            if cfg.k >= t.chunk:
                self.coders.append(_DenseCoefficients(cfg.bits))
            else:
                self.coders.append(ChunkTopKCompressor(chunk=t.chunk, k=cfg.k, bits=cfg.bits, mean="contributors"))
        # the momentum in the DCT domain, (chunks, chunk) per tensor (see the module docstring)
        self.momentum = [torch.zeros(t.chunks, t.chunk, dtype=torch.float32, device=p.device)
                         for t, p in zip(self.tiles, self.params)]
        self.timers = {"gather_wait_s": 0.0, "gather_s": 0.0}   # blocked on / duration of the gather
        self.look = Lookahead(self.params) if cfg.overlap else None
        self.optimizer = None
        if cfg.update_rule == "adamw":
            groups = [{"params": [p for p, d in zip(self.params, self.decay) if d], "weight_decay": cfg.weight_decay},
                      {"params": [p for p, d in zip(self.params, self.decay) if not d], "weight_decay": 0.0}]
            self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                               betas=tuple(cfg.betas), eps=cfg.eps)

    def exchange_over(self, replicas) -> None:
        """All-gather over ``replicas.cross_group`` (``engine=fsdp2``'s ``Islands``: the
        replicate group; the tensors are this rank's local shards, the same rows of every
        parameter on every rank of it)."""
        self.group = replicas.cross_group
        self.world_size = accounting.group_size(self.group)

    # -- bytes -----------------------------------------------------------------------
    def payload_bytes(self) -> list[int]:
        """Bytes of each tensor's payload (what one rank contributes to the all-gather)."""
        out = []
        for t, coder in zip(self.tiles, self.coders):
            zeros = torch.zeros(t.chunks, t.chunk)
            pl = coder.compress(zeros) if isinstance(coder, _DenseCoefficients) else coder.compress(zeros.reshape(-1))
            out.append(pl.nbytes)
        return out

    # -- one step --------------------------------------------------------------------
    @torch.no_grad()
    def compress_momentum(self, lr: float) -> list[Payload]:
        """M <- beta M + lr DCT(g); select the top-k coefficients of every chunk; set them to 0
        in M (m <- m - IDCT(selected at full precision)). This rank's payloads, one per tensor.
        With ``overlap``, the look-ahead direction sign(IDCT(M)) is taken before the removal."""
        c = self.cfg
        payloads = []
        for i, (p, m, tiles, coder) in enumerate(zip(self.params, self.momentum, self.tiles, self.coders)):
            m.mul_(c.beta)
            if p.grad is not None:
                m.add_(tiles.encode(local_shard(p.grad)), alpha=lr)
            if self.look is not None:
                self.look.direction[i].copy_(torch.sign(tiles.decode(m)))
            if isinstance(coder, _DenseCoefficients):
                pl = coder.compress(m)
                m.zero_()                                  # every coefficient was sent
            else:
                flat = m.view(-1)
                pl = coder.compress(flat)
                idx, _ = coder._entries(pl)
                flat[idx] = 0.0                            # the kept coefficients leave the momentum
            payloads.append(pl)
        return payloads

    def momentum_params(self) -> list[torch.Tensor]:
        """The momentum in parameter space, m = IDCT(M), per tensor (for inspection)."""
        return [t.decode(m) for t, m in zip(self.tiles, self.momentum)]

    @torch.no_grad()
    def exchange(self, payloads: list[Payload]) -> list[torch.Tensor]:
        """All-gather every rank's payloads (one accounted collective) and decode the mean
        over contributors, in rank order: U per tensor, bitwise equal on every rank."""
        return self.finish(self.launch(payloads))

    def launch(self, payloads: list[Payload]) -> "Gather":
        """Start the accounted all-gather of this rank's packed payloads (asynchronous, on the
        world's second process group, with ``overlap``; else done on return)."""
        bufs = [pack(pl) for pl in payloads]
        mine = torch.cat(bufs) if bufs else torch.empty(0, dtype=torch.uint8)
        gathered = torch.empty(self.world_size * mine.numel(), dtype=torch.uint8, device=mine.device)
        g = Gather(payloads, [b.numel() for b in bufs], gathered, time.perf_counter())
        if self.look is None:         # synchronous: the whole gather is time blocked
            accounting.all_gather_into(self.meter, gathered, mine, kind="data", group=self.group)
            g.done_at = time.perf_counter()
            self.timers["gather_wait_s"] += g.done_at - g.started
        else:
            g.work = accounting.all_gather_into(self.meter, gathered, mine, kind="data", async_op=True,
                                                group=getattr(self.world, "async_group", None))
            then(g.work.get_future(), g.mark_done)     # runs on the comm thread when the bytes are in
        return g

    @torch.no_grad()
    def finish(self, g: "Gather") -> list[torch.Tensor]:
        """Wait for ``g`` (the time blocked goes to ``gather_wait_s``) and decode U per tensor."""
        t0 = time.perf_counter()
        if g.work is not None:
            g.work.wait()
        now = time.perf_counter()
        # arrival: the callback's time if the bytes were in before this wait began, else the wait's end
        # (the callback may run a little after the wait returns); never shorter than the wait itself
        arrived = g.done_at if g.done_at is not None and g.done_at <= t0 else now
        if g.work is not None:
            self.timers["gather_wait_s"] += now - t0
            self.timers["gather_s"] += max(arrived - g.started, now - t0)
        else:
            self.timers["gather_s"] += g.done_at - g.started
        device = self.params[0].device if self.params else torch.device("cpu")
        total = sum(g.sizes)
        rows = g.gathered.view(self.world_size, total)
        out = []
        off = 0
        for pl, size, tiles, coder in zip(g.payloads, g.sizes, self.tiles, self.coders):
            received = [unpack(rows[r, off:off + size], pl) for r in range(self.world_size)]
            if isinstance(coder, _DenseCoefficients):
                q = coder.mean(received, tiles.numel, device)
            else:
                q = sparse_mean(coder, received, tiles.numel, self.world_size, device)
            out.append(tiles.decode(q))
            off += size
        return out

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        """Forward/backward; with ``overlap``, at the look-ahead parameters (see Lookahead)."""
        if self.look is None:
            return super().compute(forward_model, batch)
        with self.look.applied():
            return super().compute(forward_model, batch)

    @torch.no_grad()
    def signum_step(self, updates: list[torch.Tensor], lr: float) -> None:
        """p <- p (1 - lr wd) (matrices); p <- p - lr sign(U)."""
        wd = self.cfg.weight_decay
        for p, u, decay in zip(self.params, updates, self.decay):
            p = local_shard(p)
            if decay and wd:
                p.mul_(1.0 - lr * wd)
            p.add_(torch.sign(u).to(p.dtype), alpha=-lr)

    @torch.no_grad()
    def apply(self, step: int) -> dict[str, float]:
        c = self.cfg
        lr = self.lr(step)
        out = {"lr": lr}
        if c.grad_clip > 0:
            grads = [p for p in self.params if p.grad is not None]
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(grads, c.grad_clip))
        if self.look is not None:     # overlap: the previous step's update arrives now (module docstring)
            if self.look.pending is not None:
                self.signum_step(self.look.take(self.finish), self.look.pending_lr)
            payloads = self.compress_momentum(lr)
            self.look.launch(self.launch(payloads), lr)
            if step == self.max_steps - 1:   # the run's last step: nothing left to overlap with
                self.signum_step(self.look.take(self.finish), lr)
        elif self.optimizer is None:
            payloads = self.compress_momentum(lr)
            self.signum_step(self.exchange(payloads), lr)
        else:
            payloads = self.compress_momentum(lr)
            updates = self.exchange(payloads)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            for p, u in zip(self.params, updates):
                if p.grad is None:
                    p.grad = u.to(p.dtype)
                else:
                    p.grad.copy_(u)
            self.optimizer.step()
        payload = sum(pl.nbytes for pl in payloads)
        raw = 4 * sum(t.numel for t in self.tiles)
        out["compression_ratio"] = raw / payload if payload else 1.0
        out["payload_bytes"] = float(payload)
        out.update(self.timers)
        self.timers = dict.fromkeys(self.timers, 0.0)
        return out

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"momentum": {n: m.clone() for n, m in zip(self.names, self.momentum)}}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.look is not None:
            state["lookahead"] = self.look.state_dict(self.names, self.finish)
        return state

    def load_state_dict(self, state: dict) -> None:
        for n, m in zip(self.names, self.momentum):
            m.copy_(state["momentum"][n])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.look is not None:
            self.look.load_state_dict(state["lookahead"], self.names)
