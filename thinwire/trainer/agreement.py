"""Every rank must run the same config: a hash check at start, naming the keys that differ.

Self-started workers receive one resolved config, but under torchrun every rank composes
its own (its environment, its command line), so they can silently disagree.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ..comm import accounting


class ConfigMismatchError(RuntimeError):
    pass


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_config_agreement(cfg: DictConfig, world) -> None:
    if world.world_size == 1:
        return
    text = OmegaConf.to_yaml(cfg, resolve=True)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
    mine = torch.tensor([digest], dtype=torch.int64, device=world.device)
    hi, lo = mine.clone(), mine.clone()
    accounting.all_reduce(accounting.WireMeter(), hi, op=dist.ReduceOp.MAX, kind="setup")
    accounting.all_reduce(accounting.WireMeter(), lo, op=dist.ReduceOp.MIN, kind="setup")
    if hi.item() == lo.item():
        return
    configs: list = [None] * world.world_size
    dist.all_gather_object(configs, OmegaConf.to_container(cfg, resolve=True))
    flat = [_flatten(c) for c in configs]
    keys = sorted(k for k in set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
    detail = ", ".join(f"{k} ({' / '.join(repr(f.get(k)) for f in flat)})" for k in keys[:5])
    raise ConfigMismatchError(f"ranks run different configs; differing keys: {detail}")
