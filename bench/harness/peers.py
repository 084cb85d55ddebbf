"""torch's and torchft's peers, in one place, as thinwire's Trainer runs them: torch's DDP comm
hooks (fp16, PowerSGD, PostLocalSGD's hook) behind thinwire's ``HookState`` with their bytes
charged on thinwire's meter and their state in thinwire's checkpoints (``peer_factory``),
PostLocalSGD's optimizer around thinwire's AdamW plugin (``postlocal_plugin``), and the
fragments of torchft's Streaming DiLoCo (``fragments_of``). The rank runner that uses them is
``harness/cluster_peer.py`` (bench/cluster.py's matrix, the time-to-target protocol's peer rows,
bench/sync.py's PostLocalSGD row); torchft's runner is bench/torchft_peer.py.
"""
# no "from __future__ import annotations": DDP checks the hook's return annotation at runtime
import math

import torch
import torch.distributed as dist

from thinwire.comm.accounting import collective_bytes
from thinwire.comm.hooks import HookState
from thinwire.optim.plugins import AdamWPlugin


class PeerState(HookState):
    """A torch hook's state as thinwire's DDP engine drives it: a ``HookState`` (the engine
    calls ``set_lr``, ``commit``, ``discard``, ``take_stats``) with the torch state inside;
    ``bytes_fn(inner, bucket)``: what the torch hook sends for the bucket. Nothing of it
    is checkpointed (fp16's hook has no state; see the subclasses for the others)."""

    def __init__(self, inner, meter, bytes_fn):
        super().__init__(meter=meter, auto_commit=False)
        self.inner, self.bytes_fn = inner, bytes_fn

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def before_hook(self, bucket, first: bool) -> None:
        """Called before torch's hook on every bucket (``first``: the iteration's first)."""


class PostLocalPeer(PeerState):
    """torch's ``PostLocalSGDState``: its iteration counter decides global vs local steps,
    so it is checkpointed (else a resumed run would all-reduce gradients again for
    ``start_localSGD_iter`` steps)."""

    def state_dict(self) -> dict:
        return {**HookState.state_dict(self), "iter": int(self.inner.iter)}

    def load_state_dict(self, state: dict) -> None:
        HookState.load_state_dict(self, state)
        self.inner.iter = int(state["iter"])


def powersgd_layout(shapes, rank: int, min_rate: float = 2) -> tuple[list, dict, int, int]:
    """Where torch's ``powerSGD_hook`` keeps each tensor of one bucket (gradients of
    ``shapes``, in bucket order): ``(err, q, P size, Q size)``, ``err[i] = (offset, numel)``
    in the bucket-length error vector, ``q[i] = (offset, m r)`` in the Q memory for the
    compressed tensors only. Q is laid out as the hook does: compressed tensors (viewed
    as (n, m), r = min(n, m, rank), compressed when ``_should_compress``) grouped by that
    shape, groups in order of first appearance, bucket order within a group."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    err, groups, off = [], {}, 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        err.append((off, numel))
        off += numel
        n, m = shape[0], numel // shape[0]
        if _should_compress(n, m, min(n, m, rank), min_rate)[0]:
            groups.setdefault((n, m), []).append(i)
    q, qo, po = {}, 0, 0
    for (n, m), members in groups.items():
        r = min(n, m, rank)
        for i in members:
            q[i] = (qo, m * r)
            qo, po = qo + m * r, po + n * r
    return err, q, po, qo


def split_by_name(layout, error, qmem, rank: int, min_rate: float) -> dict:
    """``{name: (error slice, Q slice or None)}`` of one bucket's flat tensors laid out as
    ``layout`` (``((name, shape), ...)``)."""
    err, q, _, _ = powersgd_layout([s for _, s in layout], rank, min_rate)
    out = {}
    for i, (name, _) in enumerate(layout):
        o, n = err[i]
        e = None if error is None else error[o:o + n].clone()
        out[name] = (e, None if i not in q or qmem is None else qmem[q[i][0]:q[i][0] + q[i][1]].clone())
    return out


def join_by_name(layout, by_name: dict, rank: int, min_rate: float):
    """The flat ``(error, P memory, Q memory)`` for a bucket laid out as ``layout``, from
    ``by_name`` (:func:`split_by_name`'s); None where a name is missing."""
    err, q, p_size, _ = powersgd_layout([s for _, s in layout], rank, min_rate)
    if any(name not in by_name or by_name[name][0] is None for name, _ in layout):
        return None
    error = torch.cat([by_name[name][0] for name, _ in layout])
    qs = [by_name[layout[i][0]][1] for i in sorted(q, key=lambda i: q[i][0])]
    if any(x is None for x in qs):
        return None
    qmem = torch.cat(qs) if qs else error.new_empty(0)
    return error, error.new_empty(p_size), qmem


class PowerSGDPeer(PeerState):
    """torch's ``PowerSGDState`` checkpointed by parameter name.

    torch keys the error-feedback residual and the warm-started Q by ``bucket.index()``
    (flat tensors in the bucket's layout). DDP runs a new process's first iteration on its
    initial buckets and rebuilds them after it, so a resumed run sees two layouts in its
    first two iterations, neither necessarily the one the checkpoint was written under.
    Here the state is saved per parameter name, and before torch's hook runs on a bucket
    whose layout this process has not seen for that index, its flat tensors are rebuilt
    from the per-name values as of the start of the iteration (a snapshot taken at the
    iteration's first bucket, so buckets already processed in it cannot leak new values
    into others). torch's own hook runs unchanged."""

    def __init__(self, inner, meter, model=None):
        super().__init__(inner, meter, powersgd_bytes)
        if model is not None:
            self.bind(model)
        self.layouts: dict[int, tuple] = {}  # bucket index -> ((name, shape), ...) of torch's flat tensors
        self.by_name: dict = {}             # name -> (error, Q slice): loaded, or split from a snapshot
        self._snap: dict = {}

    def _split(self, snap: dict) -> dict:
        st, out = self.inner, {}
        for layout, error, qmem in snap.values():
            out.update(split_by_name(layout, error, qmem, st.matrix_approximation_rank, st.min_compression_rate))
        return out

    def _current(self) -> dict:
        st = self.inner
        return {i: (lay, st.error_dict.get(i), st.q_memory_dict.get(i)) for i, lay in self.layouts.items()}

    def before_hook(self, bucket, first: bool) -> None:
        st = self.inner
        if st.iter < st.start_powerSGD_iter:
            return  # vanilla all-reduce: no state
        if first:  # Q is updated in place by the hook: copy; the error is replaced, not written
            self._snap = {i: (lay, e, None if q is None else q.clone()) for i, (lay, e, q) in self._current().items()}
        idx = bucket.index()
        layout = tuple((n, tuple(g.shape)) for n, g in zip(self.bucket_names(bucket), bucket.gradients()))
        if self.layouts.get(idx) == layout:
            return
        self.by_name.update(self._split(self._snap))
        names = {n for n, _ in layout}
        for j in [j for j, lay in self.layouts.items() if j != idx and names & {n for n, _ in lay}]:
            del self.layouts[j]  # an old layout holding some of these parameters: stale now
            for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
                d.pop(j, None)
        flat = join_by_name(layout, self.by_name, st.matrix_approximation_rank, st.min_compression_rate)
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.pop(idx, None)
        if flat is not None:  # else (a fresh run's first compressed step) torch starts from zero / random Q
            st.error_dict[idx], st.p_memory_dict[idx], st.q_memory_dict[idx] = flat
        self.layouts[idx] = layout

    def state_dict(self) -> dict:
        st = self.inner
        by_name = {**self.by_name, **self._split(self._current())}
        _, keys, pos, has_gauss, gauss = st.rng.get_state()
        return {**HookState.state_dict(self), "iter": int(st.iter),
                "rng": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "error": {n: e for n, (e, _) in by_name.items() if e is not None},
                "q": {n: q for n, (_, q) in by_name.items() if q is not None}}

    def load_state_dict(self, state: dict) -> None:
        HookState.load_state_dict(self, state)
        st, r = self.inner, state["rng"]
        st.iter = int(state["iter"])
        st.rng.set_state(("MT19937", r["keys"].numpy().astype("uint32"), r["pos"], r["has_gauss"], r["gauss"]))
        self.by_name = {n: (e, state["q"].get(n)) for n, e in state["error"].items()}
        self.layouts, self._snap = {}, {}
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.clear()


def wrap(torch_hook):
    def hook(state: PeerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.meter.charge(state.bytes_fn(state.inner, bucket), "data", "all_reduce",  # before the hook moves
                           dist.get_world_size())                                        # its counters
        first = not state._launched
        state.begin_bucket(bucket)
        state.before_hook(bucket, first)
        return torch_hook(state.inner, bucket)
    return hook


def powersgd_bytes(st, bucket) -> int:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    p = dist.get_world_size()
    if st.iter < st.start_powerSGD_iter:
        return collective_bytes("all_reduce", bucket.buffer().numel(), 4, p)
    unc = ps = qs = 0
    for g in bucket.gradients():
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(n, m, st.matrix_approximation_rank)
        if _should_compress(n, m, r, st.min_compression_rate)[0]:
            ps, qs = ps + n * r, qs + m * r
        else:
            unc += g.numel()
    return sum(collective_bytes("all_reduce", k, 4, p) for k in (unc, ps, qs))


def peer_factory(peer: str, rank_r: int, H: int, start_iter: int | None = None):
    """A comm hook factory (``thinwire.comm.hooks.comm_hook``'s signature) that returns
    torch's hook instead, for ``Trainer(comm_hook=...)``; ``start_iter``: PowerSGD's
    ``start_powerSGD_iter`` (default 2) or PostLocalSGD's ``start_localSGD_iter`` (H-1)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (PostLocalSGDState,
                                                                                 post_localSGD_hook)

    def factory(name, *, meter, model=None, **_):
        p = dist.get_world_size()
        if peer == "fp16":
            return PeerState(None, meter, lambda st, b: collective_bytes("all_reduce", b.buffer().numel(), 2, p)), \
                wrap(default_hooks.fp16_compress_hook)
        if peer == "powersgd":
            inner = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r,
                                       start_powerSGD_iter=2 if start_iter is None else start_iter,
                                       use_error_feedback=True, warm_start=True)
            return PowerSGDPeer(inner, meter, model), wrap(psgd.powerSGD_hook)
        if peer == "postlocal":
            inner = PostLocalSGDState(process_group=None, subgroup=None,
                                      start_localSGD_iter=H - 1 if start_iter is None else start_iter,
                                      post_local_gradient_allreduce=False)
            return PostLocalPeer(inner, meter, lambda st, b: collective_bytes("all_reduce", b.buffer().numel(), 4, p)
                                 if st.iter < st.start_localSGD_iter else 0), wrap(post_localSGD_hook)
        raise ValueError(peer)
    return factory


def postlocal_plugin(H: int, warmup: int | None = None) -> type[AdamWPlugin]:
    """thinwire's AdamW plugin with its torch optimizer inside torch's
    ``PostLocalSGDOptimizer``, for ``Trainer(plugin_cls=...)``: the averager's all-reduce
    of every parameter is charged on the meter when it averages (its own condition,
    evaluated before it runs). Its state (AdamW's moments, which differ between ranks
    once they step alone, and the averager's step) is checkpointed per rank."""
    warmup = H - 1 if warmup is None else warmup
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    class Counted(PostLocalSGDOptimizer):
        def __init__(self, optim, averager, meter):
            super().__init__(optim=optim, averager=averager)
            numel = sum(q.numel() for g in optim.param_groups for q in g["params"])
            self.meter, self.nbytes = meter, collective_bytes("all_reduce", numel, 4, dist.get_world_size())

        def load_state_dict(self, state_dict):
            # torch's PostLocalSGDOptimizer binds param_groups once, in __init__; the inner
            # optimizer's load_state_dict replaces its list, so without this the LR schedule
            # would write to the old groups and a resumed run keep the checkpoint's LR
            super().load_state_dict(state_dict)
            self.param_groups = self.optim.param_groups

        def step(self):
            a = self.averager
            if a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0:
                self.meter.charge(self.nbytes, "data")  # one flat fp32 all-reduce of every parameter
            super().step()

    class PostLocalAdamW(AdamWPlugin):
        per_rank_state = True

        def make_optimizer(self, groups):
            return Counted(super().make_optimizer(groups), PeriodicModelAverager(period=H, warmup_steps=warmup),
                           self.meter)

    return PostLocalAdamW


def fragments_of(model, F: int) -> list:
    """``F`` modules covering every parameter once, as thinwire's streaming splits them
    (``thinwire.comm.streaming.strided_fragments``: block b in fragment b % F, the k-th
    parameter outside any block in fragment k % F, in model order: at F = 4 the token
    embedding (tied to the head) in 0, the position embedding in 1, the final norm in 2), so
    that torchft's fragments and thinwire's are the same parameters."""
    import torch.nn as nn

    from thinwire.comm.streaming import block_of, strided_fragments

    if F == 1:
        return [model]
    blocks = list(model.blocks)
    if F > len(blocks):
        raise SystemExit(f"--fragments={F}: the model has only {len(blocks)} blocks")
    names = [n for n, _ in model.named_parameters()]
    parts = []
    for idx in strided_fragments(names, F):
        owners = []  # the module owning each parameter: its block, or its own module outside blocks
        for i in idx:
            name = names[i]
            owner = model.get_submodule(block_of(name) or name.rsplit(".", 1)[0])
            if all(owner is not o for o in owners):
                owners.append(owner)
        parts.append(nn.ModuleList(owners))
    covered = [id(p) for m in parts for p in m.parameters()]
    assert sorted(covered) == sorted(id(p) for p in model.parameters()), "fragments must cover every parameter once"
    return parts
