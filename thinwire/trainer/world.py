"""The distributed world: one frozen object built once and passed explicitly.

Under torchrun (env://) the rank and world size come from the environment; workers
that ``thinwire-train`` starts itself get the same variables from its launcher, so
there is one code path, world size 1 included. NCCL when CUDA is available (device
= LOCAL_RANK), gloo otherwise.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..comm import groups
from .dist_config import DistConfig, is_host  # noqa: F401  (declared without torch: the config path reads them)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # collectives launched asynchronously next to others (second phases from future
    # callbacks, CO2's outer all-reduce) run on their own group, so every rank issues
    # them in the same order
    async_group: object = None
    timeout_s: float | None = None  # of every group thinwire creates (``thinwire.comm.groups``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


def init_world(backend: str = "auto", timeout_s: float = 300.0, threads: int = 0) -> World:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    backend = choose_backend(backend)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT is not set: launch with torchrun or thinwire-train")
            os.environ["MASTER_PORT"] = str(free_port())
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=attempt_store(rank, world_size, timeout),
                                device_id=device if backend == "nccl" else None)
    async_group = groups.new_group(backend=backend, timeout_s=timeout_s) if world_size > 1 else None
    return World(rank, world_size, local_rank, device, backend, async_group, timeout_s)


def current_world(device: torch.device | None = None, timeout_s: float | None = None) -> World:
    """The :class:`World` of a process whose default group someone else initialised (a
    user's loop under torchrun, Lightning, Accelerate): rank and size from the default
    group, ``device`` (default: ``cuda:LOCAL_RANK`` under NCCL, else the CPU), and a fresh
    ``async_group``. Every rank must call it, in the same order (it creates a group)."""
    if not dist.is_initialized():
        return World(0, 1, 0, device or torch.device("cpu"), "none", None)
    rank, world_size, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    async_group = groups.new_group(backend=backend, timeout_s=timeout_s) if world_size > 1 else None
    return World(rank, world_size, local_rank, device, backend, async_group, timeout_s)


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The env:// store, with keys scoped to this restart attempt.

    torchrun (2.x) keeps one rendezvous TCPStore for the whole job and hands it to every
    restart of the workers without a per-attempt prefix, so after a restart gloo can read
    a dead peer's listening address left by the previous attempt ("connectFullMesh ...
    Connection refused"). A prefix per ``TORCHELASTIC_RESTART_COUNT`` keeps attempts apart.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"thinwire/attempt_{attempt}/", store)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_rendezvous_store(addr: str):
    """The launcher's rendezvous TCPStore, listening on ``addr`` only; returns (store, port).

    torch's c10d rendezvous backend creates its store server with ``TCPStore(host, port,
    is_master=True, multi_tenant=True)``, which listens on every interface whatever host it
    is given. A multi-tenant store server is shared by every TCPStore of the process on the
    same port, so creating it first, on a socket bound to ``addr`` (``master_listen_fd``),
    makes the rendezvous use that one. The port is held from the bind on (no free-port race)."""
    import socket

    family, _, _, _, sockaddr = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(sockaddr[:2])
    sock.listen(128)
    port = sock.getsockname()[1]
    # detach: the store server owns the descriptor from now on (Python must not close it)
    store = dist.TCPStore(addr, port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                          wait_for_workers=False)
    return store, port


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
