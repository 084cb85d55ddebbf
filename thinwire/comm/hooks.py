"""DDP communication hooks: a State object plus a pure ``(state, bucket) -> Future``
function, the pattern of torch's ``powerSGD_hook``: ``allreduce_hook`` (``comm=none``) and
``compressed_hook`` (every compressor).

What we keep from that pattern and what we change:

- the State holds hyperparameters, buffers and statistics and drops its process group
  when pickled, so it can be checkpointed;
- per-parameter buffers are keyed by *parameter name*, never by ``bucket.index()``:
  DDP runs its first iteration on initial buckets and rebuilds them afterwards, so after
  a restart a bucket index names other parameters;
- buffer updates computed during backward are *staged* (by the aggregator) and only
  committed once the step is accepted (the trainer calls ``commit()``; a skipped
  non-finite step calls ``discard()``). Used from a plain user loop, ``auto_commit=True``
  commits an iteration's updates when the next iteration's first bucket arrives (DDP has
  waited for every bucket of the previous one by then; committing from a callback would
  race with the other buckets' callbacks) or when ``state_dict()`` is taken;
- every collective goes through ``thinwire.comm.accounting`` so wire bytes are counted;
- no ``fut.wait()`` inside callbacks: work is chained with ``Future.then``.

The compressed hook, per bucket: error feedback -> compress each parameter -> one
collective -> decompress -> what the optimizer sees, written back into the bucket.

- The first ``warmup_steps`` accepted steps are plain fp32 all-reduces (DDP rebuilds its
  buckets after the first iteration; EF21 / EControl initialise their buffers from these
  dense rounds, at least one of them).
- Parameters with fewer than ``min_numel`` elements (biases, norms) travel uncompressed.
- The error-feedback residual is kept in gradient units and rescaled by lr_{t-1} / lr_t
  when the trainer reports a new learning rate (``set_lr``), see feedback.py. A state built
  with ``optimizer=`` follows the optimizer instead: at the first bucket of each iteration
  it reads ``optimizer.param_groups[0]["lr"]``, the rate the coming ``optimizer.step()``
  uses when the loop (or a torch LR scheduler, stepped after ``optimizer.step()``) sets it
  before backward.
- ``state_dict()`` is per rank and carries the comm config it was built with (its
  *fingerprint*: every key, defaults filled in) and the rank; ``load_state_dict`` refuses a
  state written under another config or by another rank, in one line naming the keys.
"""
# no "from __future__ import annotations": DDP checks the hook's return annotation at runtime
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..configdiff import changes, describe_changes
from ..errors import ResumeConfigError, need, non_negative, one_of
from ..errors import ConfigError
from ..options import defaults, option_keys, options_of, resolve
from ..registry import Registry
from . import accounting, collectives
from .accounting import WireMeter
from .aggregator import CompressedAggregator, check_combination, compressor_from_config
from .futures import then
from .compressors import COMPRESSORS, NoneCompressor, compressor_class, is_exact  # noqa: F401
from .feedback import FEEDBACKS, check_feedback_options, feedback_options

HOOKS: Registry[Callable] = Registry("comm", "thinwire.comm_hooks")
COLLECTIVES = ("auto",) + collectives.COLLECTIVES


@dataclass
class CommConfig:
    """The group-wide keys of ``comm`` (valid whatever the compressor); each compressor adds
    its own (``ratio``, ``block_size``, ...: its ``__init__``'s parameters) and each feedback
    rule its own (``eta``, ``init``, ``ef_decay``)."""
    name: str = "none"
    feedback: str = "none"           # none | ef | ef21 | ef21m | econtrol
    warmup_steps: int = 0            # plain all-reduce for the first steps (local/co2: outer rounds)
    min_numel: int = 0               # tensors smaller than this are sent uncompressed
    collective: str = "auto"         # auto | allreduce | allgather | two_phase
    seed: int = 0                    # of the compressor's randomness (rand-k indices, stochastic rounding)

    def check(self) -> None:
        check_comm(vars(self))


def check_comm(values: dict) -> None:
    """Group-wide checks of a comm config (``values``: every key of the chosen option)."""
    one_of(values["feedback"], FEEDBACKS.names(), "feedback")
    need(not is_exact(values["name"]) or values["feedback"] == "none", "feedback", values["feedback"],
         "needs a compressor (comm=none sends exact gradients)")
    non_negative(_Values(values), "warmup_steps", "min_numel")
    one_of(values["collective"], COLLECTIVES, "collective")
    check_feedback_options(values["feedback"], values)
    if not is_exact(values["name"]) and values["name"] not in HOOKS:
        check_combination(compressor_from_config(values["name"], values), values)


def comm_base() -> type:
    """The group-wide keys of ``comm``: :class:`CommConfig`'s and every feedback rule's."""
    return dataclasses.make_dataclass("CommConfig", [], bases=(feedback_options(), CommConfig))


def comm_parts() -> dict:
    """``comm`` name -> its part: the registered hooks and every compressor (a compressor's
    options are its ``__init__``'s parameters, ``seed`` group-wide)."""
    return {**{n: HOOKS.get(n) for n in HOOKS.names()}, **{n: compressor_class(n) for n in COMPRESSORS.names()}}


def resolve_comm(name: str, options: dict) -> dict:
    """Comm config ``name`` with ``options``, through the one resolver
    (``thinwire.options.resolve``): every key, defaults filled in, typed, finite and checked
    as ``thinwire-train comm=<name> comm.<key>=...`` checks it."""
    parts = comm_parts()
    if name not in parts:
        raise ConfigError(f"comm={name!r}: unknown; valid: {', '.join(sorted(parts))}")
    return resolve("comm", name, parts[name], options, base=comm_base(), skip=("seed",))


class _Values:
    def __init__(self, values: dict):
        self.__dict__.update(values)


class HookState:
    """Base state of every comm hook the trainer drives (see the module docstring): the
    engine calls ``set_lr`` before each step, ``commit``/``discard`` after it,
    ``take_stats`` for its metrics, ``state_dict``/``load_state_dict`` for checkpoints and
    reads ``last_launch_s`` (set by ``begin_bucket``). A foreign hook (torch's
    ``ddp_comm_hooks``) is plugged in with a subclass that holds the foreign state."""

    def __init__(self, process_group=None, meter: Optional[WireMeter] = None, model=None,
                 warmup_steps: int = 0, min_numel: int = 0, auto_commit: bool = True,
                 second_group=None, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[dict] = None):
        self.process_group = process_group
        self.second_group = second_group
        self.meter = meter if meter is not None else WireMeter()
        self.warmup_steps = warmup_steps
        self.min_numel = min_numel
        self.auto_commit = auto_commit
        self.iteration = 0            # accepted steps so far
        self.last_launch_s = 0.0      # perf_counter() of the latest bucket launch
        self.param_names: dict[int, str] = {}
        self._iteration_done = False  # auto_commit: the last bucket of an iteration was launched
        self._launched = False        # a bucket of the current iteration was launched
        self.optimizer = optimizer    # followed for the learning rate (module docstring)
        self.config = dict(config or {})  # the comm config's fingerprint (checked on load)
        if model is not None:
            self.bind(model)

    # -- naming ------------------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> None:
        """Learn parameter names (``module.`` prefix of DDP stripped)."""
        self.param_names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}

    def bucket_names(self, bucket) -> list[str]:
        """Names of the bucket's parameters. Without ``model=``, parameters are named
        ``param<k>`` in order of first appearance: bucket by bucket (DDP launches buckets
        in index order) on the first iteration, which always runs on DDP's initial buckets,
        so the names are the same after a restart."""
        names = []
        for p in bucket.parameters():
            if id(p) not in self.param_names:
                self.param_names[id(p)] = f"param{len(self.param_names)}"
            names.append(self.param_names[id(p)])
        return names

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    def in_warmup(self) -> bool:
        return self.iteration < self.warmup_steps

    def set_lr(self, lr: float) -> None:
        """The learning rate of the step about to run (error-feedback residual rescaling)."""

    def follow_lr(self) -> None:
        """With ``optimizer=``: this iteration's learning rate, read from the optimizer."""
        if self.optimizer is not None:
            self.set_lr(float(self.optimizer.param_groups[0]["lr"]))

    def take_stats(self) -> dict:
        """Metrics of the step just finished (compression ratio, residual norm); resets them."""
        return {}

    # -- accepting a step --------------------------------------------------------
    def commit(self) -> None:
        """Accept the step: advance the iteration (subclasses apply their staged buffers)."""
        self.iteration += 1
        self._launched = False

    def discard(self) -> None:
        """Reject the step (non-finite gradients): buffers stay exactly as they were."""
        self._launched = False

    def begin_bucket(self, bucket) -> None:
        """Called by every hook when it launches a bucket (main thread)."""
        self.last_launch_s = time.perf_counter()
        if self.auto_commit and self._iteration_done:
            self._iteration_done = False
            self.commit()
        if not self._launched:  # the iteration's first bucket
            self._launched = True
            self.follow_lr()
        if bucket.is_last():
            self._iteration_done = True

    def _flush(self) -> None:
        if self.auto_commit and self._iteration_done:
            self._iteration_done = False
            self.commit()

    # -- checkpointing -----------------------------------------------------------
    def rank(self) -> tuple[int, int]:
        """(rank, world size) in the hook's process group."""
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def state_dict(self) -> dict:
        """This rank's state (one file per rank), with the config fingerprint and the rank."""
        self._flush()
        rank, world = self.rank()
        return {"iteration": self.iteration, "config": dict(self.config), "rank": rank, "world_size": world}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict()``: refused (one line) when it was written under
        another comm config or by another rank (a state from before fingerprints loads as is)."""
        check_fingerprint("comm hook state", state.get("config"), self.config)
        if "rank" in state and (state["rank"], state["world_size"]) != self.rank():
            rank, world = self.rank()
            raise ResumeConfigError(f"comm hook state: written by rank {state['rank']} of {state['world_size']}, "
                                    f"loaded on rank {rank} of {world}; the state is per rank: load each "
                                    f"rank's own file at the same world size")
        self.iteration = int(state["iteration"])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["process_group"] = None
        d["second_group"] = None
        d["optimizer"] = None
        return d


def check_fingerprint(what: str, saved: Optional[dict], current: dict) -> None:
    """Raise ``ResumeConfigError`` (one line) when ``saved`` and ``current`` differ in any
    key (the comparison of the trainer's resume check; nothing is safe to change here)."""
    if not saved or not current:
        return
    diff = changes(saved, current)
    if diff:
        raise ResumeConfigError(f"{what}: written under another config: {describe_changes(diff)}; "
                                  f"build it with the saved values to load this state")


def fingerprint(name: str, cfg: dict) -> dict:
    """Every key of comm config ``name``: the defaults of its compressor, the group-wide keys
    and the feedback rules' keys, overridden by ``cfg`` (state keys left out)."""
    keys = defaults(CommConfig) | defaults(feedback_options())
    if name not in HOOKS:
        keys |= defaults(options_of(compressor_class(name)))
    out = {**keys, **{k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}, "name": name}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


# ``comm_hook``'s signature, ``(name, **cfg) -> (state, hook)``: the DDP engine takes any such
# factory (a benchmark plugs a peer's hook in through it, with a HookState subclass as state)
CommHookFactory = Callable[..., tuple[HookState, Callable]]


def allreduce_hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Plain fp32 all-reduce of the bucket, averaged over ranks (``comm=none``)."""
    state.begin_bucket(bucket)
    buf = bucket.buffer()
    work = accounting.all_reduce(state.meter, buf, group=state.process_group, async_op=True)
    world = state.world_size

    def average(fut: torch.futures.Future) -> torch.Tensor:
        return fut.value()[0].div_(world)

    return then(work.get_future(), average)


STATE_KEYS = ("process_group", "second_group", "meter", "model", "warmup_steps", "min_numel", "auto_commit",
              "optimizer")
# keys of a comm config that are per-process objects, never part of its fingerprint
RUNTIME_KEYS = ("process_group", "second_group", "meter", "model", "auto_commit", "optimizer")


def state_kwargs(cfg: dict, name: str = "none") -> dict:
    """The HookState fields of a comm config (and its fingerprint); compression fields go
    to the compressor."""
    out = {k: v for k, v in cfg.items() if k in STATE_KEYS}
    out["config"] = fingerprint(name, cfg)
    return out


def comm_names() -> list[str]:
    """Every valid ``comm`` name: the registered hooks and every compressor, built in or
    from the ``thinwire.compressors`` entry points."""
    return sorted(set(HOOKS.names()) | set(COMPRESSORS.names()))


def comm_hook(name: str = "none", **cfg) -> tuple[HookState, Callable]:
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    ``name`` is a ``comm`` config name (a hook registered in ``HOOKS``, or any compressor:
    built-in or from the ``thinwire.compressors`` entry points); ``cfg`` takes the same
    fields as the config group plus ``process_group``, ``second_group`` (needed by the
    two-phase collective at world size > 1), ``meter``, ``model`` (parameter names) and
    ``optimizer`` (followed for the learning rate of the error-feedback rescaling, instead
    of calling ``state.set_lr`` every step; docs/library.md).
    """
    runtime = {k: v for k, v in cfg.items() if k in RUNTIME_KEYS}
    options = resolve_comm(name, {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS})
    if is_exact(name):  # comm=none: the plain fp32 all-reduce; no compressor runs
        return HookState(**state_kwargs({**options, **runtime}, name)), allreduce_hook
    if name in HOOKS:
        return HOOKS.get(name, "comm")(**options, **runtime)
    return compressed_factory(name)(**options, **runtime)


def comm_config(name: str = "none", **options) -> dict:
    """The whole comm config ``name`` with ``options`` (defaults filled in), checked as the
    trainer checks ``comm.*``: what a sync strategy's averager takes as ``comm_cfg``."""
    return fingerprint(name, {k: v for k, v in resolve_comm(name, options).items() if k != "name"})


# ----------------------------------------------------------------------------- compressed
class CompressedState(HookState):
    def __init__(self, name: str, fields: dict, **state_cfg):
        super().__init__(**state_cfg)
        self.aggregator = CompressedAggregator(name, fields, self.meter, self.process_group,
                                               self.second_group)
        if self.aggregator.feedback.dense_init:
            self.warmup_steps = max(self.warmup_steps, 1)
        self.lr_prev: Optional[float] = None
        self.lr_now: Optional[float] = None

    def set_lr(self, lr: float) -> None:
        """The learning rate of the step about to run (for the EF residual's rescaling). In a
        user loop (``auto_commit``) the previous iteration is committed first, so its rate
        becomes ``lr_prev`` (before this fix a loop calling ``set_lr`` before backward got
        lr_prev = lr_now, a ratio of 1, at every step)."""
        self._flush()
        self.lr_now = lr

    @property
    def lr_ratio(self) -> float:
        if self.lr_prev is None or not self.lr_now:
            return 1.0
        return self.lr_prev / self.lr_now

    def commit(self) -> None:
        self.aggregator.commit()
        if self.lr_now is not None:
            self.lr_prev = self.lr_now
        super().commit()

    def discard(self) -> None:
        self.aggregator.discard()
        super().discard()

    def take_stats(self) -> dict:
        return self.aggregator.take_stats()

    def launch(self, names: list[str], flats: list[torch.Tensor]) -> torch.futures.Future:
        """Future of the means of the named 1-D gradients: a dense round in warm-up, else
        compressed with error feedback (staged until ``commit``). DDP's hook calls it per
        bucket; ``engine=fsdp2`` once per step on the local gradient shards."""
        if self.in_warmup():
            return self.aggregator.launch_dense(names, flats)
        return self.aggregator.launch(names, flats, self.iteration, self.lr_ratio)

    def state_dict(self) -> dict:
        base = super().state_dict()  # flushes a pending auto-commit first
        return {**base, "lr_prev": self.lr_prev, "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lr_prev = state["lr_prev"]
        self.aggregator.load_state_dict(state["aggregator"])


def compressed_hook(state: CompressedState, bucket) -> torch.futures.Future[torch.Tensor]:
    state.begin_bucket(bucket)
    buf = bucket.buffer()
    names = state.bucket_names(bucket)
    sizes = [p.numel() for p in bucket.parameters()]
    views = list(buf.split(sizes))
    fut = state.launch(names, views)

    def write_back(f: torch.futures.Future) -> torch.Tensor:
        for view, out in zip(views, f.value()):
            view.copy_(out)
        return buf

    return then(fut, write_back)


def compressed_factory(name: str) -> Callable:
    def factory(**cfg):
        return CompressedState(name, cfg, **state_kwargs(cfg, name)), compressed_hook
    return factory
