"""``engine=deepspeed``'s options and the rules it checks: ``engine.deepspeed`` is DeepSpeed's
own config, passed through to ``deepspeed.initialize``; thinwire fills in the keys it owns
(batch sizes, accumulation = 1, the optimizer, gradient clipping from ``optim.grad_clip``)
and rejects them if set (:func:`check_config`, the engine's ``check_run``).

Nothing here imports DeepSpeed (it takes seconds); :func:`check_config` only asks whether
it is installed.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..comm import collectives
from ..comm.compressors import compressor_class
from ..errors import ConfigError
from . import zero_replicas

SUPPORTED = ("engine=deepspeed works with sync=ddp and comm=none, or sync=local|co2 across ZeRO replica groups "
             "(engine.zero_group_size ranks each, any comm= for the outer average); optim=sgd|adamw; "
             "engine.deepspeed.zero_optimization.stage=1|2")
# keys thinwire sets itself: the loop, the data and the optimizer plugin decide them
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
         "scheduler")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _clean(d):
    """Drop null entries (the YAML lists optional keys as null), recursively."""
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items() if v is not None}
    return d


def _stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def default_deepspeed_config() -> dict:
    """DeepSpeed's own config (passed to ``deepspeed.initialize``; null entries are left out)."""
    return {
        "zero_optimization": {
            "stage": 2,                         # 1: optimizer state sharded | 2: + gradients sharded
            "reduce_scatter": True,             # false: gradients all-reduced
            # false (with reduce_scatter): each gradient slice is reduced to its owner only:
            # half the gradient bytes of an all-reduce
            "use_multi_rank_bucket_allreduce": True,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 500000000,
            "allgather_bucket_size": 500000000,
            "offload_optimizer": {"device": "none"},  # cpu: optimizer state and step in host memory
        },
        "bf16": {"enabled": False},             # bf16 parameters and gradients, fp32 master weights
        "communication_data_type": None,        # gradient reduction dtype: fp32 | bf16 (null = parameter dtype)
        "gradient_clipping": None,              # null = optim.grad_clip
    }


@dataclass
class DeepSpeedOptions:
    deepspeed: dict = field(default_factory=default_deepspeed_config)
    zero_group_size: Optional[int] = None  # sync=local|co2: ranks per ZeRO replica group (null = ranks per node)


def check_config(cfg) -> None:
    """Combinations ``engine=deepspeed`` supports, from the parts' capability flags; each
    failure is one ConfigError line."""
    from omegaconf import OmegaConf

    from ..comm.sync import SYNC_STRATEGIES
    from ..optim.plugins import OPTIMIZERS

    ds = _clean(OmegaConf.to_container(cfg.engine.deepspeed, resolve=True))

    def need(cond: bool, key: str, value, why: str = "") -> None:
        if not cond:
            raise ConfigError(f"{key}={value}: {why or 'not supported'}; {SUPPORTED}")

    if importlib.util.find_spec("deepspeed") is None:  # no import here: it takes seconds
        raise ConfigError("engine=deepspeed: DeepSpeed is not installed (pip install 'thinwire[deepspeed]')")
    strategy = SYNC_STRATEGIES.get(cfg.sync.name, "sync")
    need(strategy.needs_grad_allreduce or strategy.supports_replica_groups, "sync", cfg.sync.name)
    world = int(os.environ.get("WORLD_SIZE", cfg.dist.nproc))
    size = zero_replicas.group_size(cfg.engine.zero_group_size, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if strategy.needs_grad_allreduce:
        need(cfg.comm.name == "none", "comm", cfg.comm.name,
             "DeepSpeed reduces gradients itself and has no compression hook (engine.deepspeed."
             "communication_data_type=bf16 halves gradient bytes)")
        need(cfg.engine.zero_group_size in (None, world), "engine.zero_group_size", cfg.engine.zero_group_size,
             f"sync=ddp runs ZeRO over all {world} ranks; replica groups are for sync=local|co2")
    else:
        need(size >= 1 and world % size == 0 and world // size >= 2, "engine.zero_group_size", size,
             f"sync={cfg.sync.name} averages across ZeRO replica groups: the group size must divide the "
             f"world size ({world}) into at least 2 groups")
    need(OPTIMIZERS.get(cfg.optim.name, "optim").steps_torch_optimizer, "optim", cfg.optim.name,
         "DeepSpeed steps a torch optimizer")
    need(_stage(ds) in (1, 2), "engine.deepspeed.zero_optimization.stage", _stage(ds),
         "stage 0 is plain data parallelism (use engine=ddp); stage 3 is not wired in")
    for key in OWNED:
        need(key not in ds, f"engine.deepspeed.{key}", ds.get(key),
             "set by thinwire (data.batch_size, optim=...); remove it")
    need(not (ds.get("bf16", {}).get("enabled", False) and _stage(ds) == 1), "engine.deepspeed.bf16.enabled", True,
         "with zero_optimization.stage=1 DeepSpeed switches to its BF16_Optimizer, which thinwire does not drive; "
         "use stage 2")
    need(not ds.get("fp16", {}).get("enabled", False) or torch.cuda.is_available(),
         "engine.deepspeed.fp16.enabled", True, "fp16 needs a GPU; use bf16")
    clip = ds.get("gradient_clipping", 0.0)
    need(not (clip and cfg.optim.grad_clip and clip != cfg.optim.grad_clip), "engine.deepspeed.gradient_clipping",
         clip, f"disagrees with optim.grad_clip={cfg.optim.grad_clip}; set one of them")
    comm_dtype = ds.get("communication_data_type")
    need(comm_dtype is None or comm_dtype in DTYPE_BYTES, "engine.deepspeed.communication_data_type", comm_dtype,
         "expected fp32 | bf16 | fp16")


def deepspeed_config(engine_cfg, optim_cfg, batch_size: int, world_size: int) -> dict:
    """DeepSpeed's config: ``engine.deepspeed`` plus the keys thinwire owns."""
    from omegaconf import OmegaConf

    ds = _clean(OmegaConf.to_container(engine_cfg.deepspeed, resolve=True))
    ds.update({
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world_size,
        "gradient_clipping": ds.get("gradient_clipping") or float(optim_cfg.grad_clip),
        "zero_allow_untested_optimizer": True,   # the plugin's torch optimizer
        "zero_force_ds_cpu_optimizer": False,    # offload with a torch optimizer, not cpu_adam
    })
    ds.setdefault("steps_per_print", 2 ** 62)
    return ds


def is_two_phase(comm_cfg) -> bool:
    """Whether the outer average across replica groups uses the two-phase collective, which
    needs a second cross group: read from the compressor class's algebra flags and
    ``comm.collective`` (nothing is built; the averager builds the one compressor)."""
    name = comm_cfg.name
    return name != "none" and collectives.select_collective(
        compressor_class(name), comm_cfg.get("collective", "auto")) == "two_phase"
