"""``elastic=torchft``: its options and their one-line checks (``ConfigError``: exit 2).

Keys (``elastic.*``): ``name`` (none | torchft), ``lighthouse`` (host:port of a running
``torchft_lighthouse``; empty: the launcher starts one on ``dist.master_addr`` and
``lighthouse_port``), ``min_replicas``, ``heartbeat_ms``, ``grace_s`` (the lighthouse's join
timeout: how long a quorum waits for a live replica that has not asked yet),
``quorum_timeout_s``, ``timeout_s`` (a collective's timeout on a hung peer), ``max_restarts``,
``lighthouse_port``, ``private_network``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import ConfigError, need, one_of

SUPPORTED_SYNC = ("local", "diloco")
OWN_EXCHANGE_PLUGINS = ("demo", "adam1bit", "mezo", "zo_dist")


@dataclass
class ElasticConfig:
    name: str = "none"               # none | torchft
    lighthouse: str = ""             # host:port of a running lighthouse ("" = the launcher starts one)
    lighthouse_port: int = 29510
    min_replicas: int = 1
    heartbeat_ms: int = 100          # the Manager's heartbeat interval
    heartbeat_timeout_ms: int = 1500 # the lighthouse drops a replica silent this long
    grace_s: float = 1.0             # the lighthouse's join timeout (a late replica's window)
    quorum_timeout_s: float = 60.0
    timeout_s: float = 10.0          # a collective on a hung peer fails after this
    max_restarts: int = 3
    private_network: bool = False

    def check(self) -> None:
        one_of(self.name, ("none", "torchft"), "elastic")
        need(self.min_replicas >= 1, "elastic.min_replicas", self.min_replicas, "must be >= 1")
        for key in ("heartbeat_ms", "heartbeat_timeout_ms", "lighthouse_port"):
            v = getattr(self, key)
            need(isinstance(v, int) and v > 0, f"elastic.{key}", v, "must be a positive integer")
        need(self.heartbeat_timeout_ms > self.heartbeat_ms, "elastic.heartbeat_timeout_ms",
             self.heartbeat_timeout_ms, f"must exceed elastic.heartbeat_ms={self.heartbeat_ms}")
        for key in ("grace_s", "quorum_timeout_s", "timeout_s"):
            v = getattr(self, key)
            need(v > 0, f"elastic.{key}", v, "must be positive (seconds)")
        need(self.max_restarts >= 0, "elastic.max_restarts", self.max_restarts, "must be >= 0")
        if self.lighthouse:
            host, sep, port = self.lighthouse.rpartition(":")
            need(bool(sep and host and port.isdigit()), "elastic.lighthouse", self.lighthouse, "expected host:port")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_elastic(el: ElasticConfig, *, sync: str, slots: int, master_addr: str = "127.0.0.1",
                  engine: str = "ddp", optim: str = "") -> None:
    """The whole-run checks of ``elastic=torchft`` (one line each, naming the key)."""
    el.check()
    if el.name == "none":
        return
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise ConfigError("elastic=torchft: torchft is not installed (pip install 'thinwire[elastic]')") from None
    need(sync in SUPPORTED_SYNC, "sync", sync,
         f"elastic=torchft needs ranks that diverge between syncs ({', '.join(SUPPORTED_SYNC)}); "
         f"sync=ddp stays fail-stop")
    need(engine == "ddp", "engine", engine, "elastic=torchft supports engine=ddp only")
    need(optim not in OWN_EXCHANGE_PLUGINS, "optim", optim,
         "this optimizer plugin owns its exchange; elastic=torchft cannot retry or heal it")
    need(el.min_replicas <= slots, "elastic.min_replicas", el.min_replicas,
         f"above the slot count dist.nproc={slots}")
    need(el.private_network or is_loopback(master_addr), "dist.master_addr", master_addr,
         "torchft's Manager listens on all interfaces and advertises its host: a non-loopback address "
         "needs elastic.private_network=true")
