"""``dist``'s options, in a module that imports no torch so that a config can be refused
without it (``thinwire.config.fast``); the process group itself is ``thinwire.trainer.world``."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import need, non_negative, one_of, positive


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def is_host(addr: str) -> bool:
    """``addr`` is an IPv4/IPv6 address or a DNS host name (no port, no spaces)."""
    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        pass
    return 0 < len(addr) <= 253 and all(_HOST_LABEL.match(p) for p in addr.split("."))


@dataclass
class DistConfig:
    """``dist``: how the processes of a run are started and connected."""
    nproc: int = 2                   # workers thinwire-train starts when not under torchrun
    threads: int = 0                 # torch threads per worker; 0 = cores // local workers
    backend: str = "auto"            # auto (nccl with CUDA, else gloo) | gloo | nccl
    master_addr: str = "127.0.0.1"
    timeout_s: float = 300.0         # collective timeout: a hung peer fails the job after this
    max_restarts: int = 0            # self-launched workers: elastic restarts from the newest checkpoint

    def check(self) -> None:
        need(self.nproc >= 1, "nproc", self.nproc, "must be >= 1")
        need(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = cores / local workers)")
        one_of(self.backend, ("auto", "gloo", "nccl"), "backend")
        positive(self, "timeout_s")
        need(is_host(self.master_addr), "master_addr", self.master_addr,
             "must be a host name or an IP address, without a port (the port is chosen free)")
        non_negative(self, "max_restarts")
        if self.backend == "nccl":  # the one check that needs torch, imported only then
            import torch

            need(torch.cuda.is_available(), "backend", self.backend, "needs CUDA, which is not available")
