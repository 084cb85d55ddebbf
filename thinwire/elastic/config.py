"""``elastic=torchft``: its options and their one-line checks (``ConfigError``: exit 2).

``ElasticConfig`` is the schema of the fixed config group ``elastic`` (``configs/elastic/``);
its own checks name keys relative to the group (the assembler adds ``elastic.``);
:func:`check_elastic` holds the rules that span groups (``thinwire.config.rules``).

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

SUPPORTED_SYNC = ("local",)      # sync=local and its preset sync=diloco
OWN_EXCHANGE_PLUGINS = ("demo", "adam1bit", "mezo", "zo_dist")


@dataclass
class ElasticConfig:
    name: str = "none"               # none | torchft
    lighthouse: str = ""             # host:port of a running lighthouse ("" = the launcher starts one)
    lighthouse_port: int = 29510     # the lighthouse's port on dist.master_addr when the launcher starts it
    min_replicas: int = 1            # no round commits with fewer live slots (the lighthouse's quorum size)
    heartbeat_ms: int = 100          # the Manager's heartbeat interval
    heartbeat_timeout_ms: int = 1500 # the lighthouse drops a replica silent this long
    grace_s: float = 1.0             # the lighthouse's join timeout (a late replica's window)
    quorum_timeout_s: float = 60.0   # a slot fails when no round commits within this
    timeout_s: float = 10.0          # a collective on a hung peer fails after this
    max_restarts: int = 3            # restarts of a slot's process by the launcher (or torchrun --max-restarts)
    private_network: bool = False    # allow a non-loopback dist.master_addr (torchft's Manager binds every interface)

    def check(self) -> None:
        one_of(self.name, ("none", "torchft"), "name")
        need(self.min_replicas >= 1, "min_replicas", self.min_replicas, "must be >= 1")
        for key in ("heartbeat_ms", "heartbeat_timeout_ms", "lighthouse_port"):
            v = getattr(self, key)
            need(isinstance(v, int) and v > 0, key, v, "must be a positive integer")
        need(self.heartbeat_timeout_ms > self.heartbeat_ms, "heartbeat_timeout_ms",
             self.heartbeat_timeout_ms, f"must exceed heartbeat_ms={self.heartbeat_ms}")
        for key in ("grace_s", "quorum_timeout_s", "timeout_s"):
            v = getattr(self, key)
            need(v > 0, key, v, "must be positive (seconds)")
        need(self.max_restarts >= 0, "max_restarts", self.max_restarts, "must be >= 0")
        if self.lighthouse:
            host, sep, port = self.lighthouse.rpartition(":")
            need(bool(sep and host and port.isdigit()), "lighthouse", self.lighthouse, "expected host:port")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_elastic(el: ElasticConfig, *, sync: str, slots: int, master_addr: str = "127.0.0.1",
                  engine: str = "ddp", optim: str = "", fragments: int = 1) -> None:
    """The rules of ``elastic=torchft`` that span groups (one line each, naming the key);
    ``el`` has passed its own ``check``."""
    if el.name == "none":
        return
    need(sync in SUPPORTED_SYNC, "sync", sync,
         "elastic=torchft needs replicas that diverge between syncs (sync=local or sync=diloco); "
         "sync=ddp stays fail-stop")
    need(fragments == 1, "sync.fragments", fragments, "elastic=torchft: streaming fragments are not elastic yet")
    need(engine == "ddp", "engine", engine, "elastic=torchft supports engine=ddp only")
    need(optim not in OWN_EXCHANGE_PLUGINS, "optim", optim,
         "this optimizer plugin owns its exchange; elastic=torchft cannot retry or heal it")
    need(el.min_replicas <= slots, "elastic.min_replicas", el.min_replicas,
         f"above the slot count ({slots}: dist.nproc)")
    need(el.private_network or is_loopback(master_addr), "dist.master_addr", master_addr,
         "torchft's Manager listens on all interfaces and advertises its host: a non-loopback address "
         "needs elastic.private_network=true")
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise ConfigError("elastic=torchft: torchft is not installed (pip install 'thinwire[elastic]')") from None


# comm=... with a joiner rule for its feedback buffers (thinwire.elastic.exchange): compressor -> rules
COMPRESSED = {"chunk_topk": ("ef", "none"), "topk": ("ef", "none", "ef21")}


def comm_refusal(comm) -> tuple[str, object, str] | None:
    """Why ``comm`` has no joiner rule (docs/elastic.md, "Compressed pseudo-gradients"), as
    (key, value, reason), or None: ``comm=none``; ``chunk_topk`` or ``topk`` with ``feedback=ef|none``
    (residual 0); ``topk`` with ``feedback=ef21`` (after every change one dense round, whose exact
    live mean the outer step takes, then EF21 restarts from g_i = G = 0: topk's mean is exactly
    mean_i C(x_i), as EF21 needs); over the sparse all-gather's algebra."""
    if comm.name == "none":
        return None
    fb, coll = comm.get("feedback", "none"), comm.get("collective", "auto")
    if comm.name not in COMPRESSED:
        return "comm", comm.name, (f"compressed pseudo-gradients have a joiner rule for comm="
                                   f"{' | '.join(COMPRESSED)} only; use comm=none, chunk_topk or topk")
    if fb not in COMPRESSED[comm.name]:
        return "comm.feedback", fb, (f"comm={comm.name} has a joiner rule for comm.feedback="
                                     f"{' | '.join(COMPRESSED[comm.name])} only (ef21: comm=topk, one dense round "
                                     "after every membership change; EControl, EF21-SGDM and DGC have none yet)")
    if fb == "ef21" and comm.get("init", "dense") != "dense":
        return "comm.init", comm.get("init"), "elastic EF21 takes a dense round after every membership change " \
                                              "(and at the start); use comm.init=dense"
    if coll not in ("auto", "allgather"):
        return "comm.collective", coll, ("two_phase keeps server residuals with no reset rule for a membership "
                                         "change; use comm.collective=auto")
    return None


def check_trainer(cfg, plugin_cls) -> None:
    """What ``thinwire-train elastic=torchft`` runs (docs/elastic.md), one line each (exit 2):
    whole-model rounds of ``sync=local|diloco`` with ``comm=none|chunk_topk|topk``
    (:func:`comm_refusal`), a torch inner optimizer (the joiner rule clears its state), a run of
    whole rounds; ``trainer.faults.kill_in_collective_at`` only under ``elastic=torchft``."""
    s, t = cfg.sync, cfg.trainer
    at = t.faults.get("kill_in_collective_at")
    if cfg.elastic.name == "none":
        need(at is None, "trainer.faults.kill_in_collective_at", at, "a death inside the outer collective is an "
             "elastic drill: it needs elastic=torchft")
        wait = t.faults.get("rejoin_wait_at")
        need(wait is None, "trainer.faults.rejoin_wait_at", wait, "waiting for a restarted slot is an elastic "
             "drill's pacing: it needs elastic=torchft")
        return
    need(t.faults.get("absent_at") is None, "trainer.faults.absent_at", t.faults.get("absent_at"),
         "a planned absence is the reference of elastic=torchft, not a fault of it; use elastic=none")
    for k in ("fragment_delay", "moment1_every", "moment2_every"):
        need(s.get(k, 0) == 0, f"sync.{k}", s.get(k), "elastic=torchft runs one whole-model round at a time")
    bad = comm_refusal(cfg.comm)
    if bad is not None:
        raise ConfigError(f"{bad[0]}={bad[1]}: elastic=torchft: {bad[2]}")
    need(getattr(plugin_cls, "steps_torch_optimizer", False), "optim", cfg.optim.name,
         "elastic=torchft: the joiner's fresh inner optimizer needs a torch optimizer (sgd, adamw, ...)")
    need(t.max_steps % s.local_steps == 0, "trainer.max_steps", t.max_steps,
         f"elastic=torchft runs whole rounds: a multiple of sync.local_steps={s.local_steps}")
    need(t.eval_every % s.local_steps == 0, "trainer.eval_every", t.eval_every,
         f"elastic=torchft evaluates the consensus at a round's end: a multiple of sync.local_steps={s.local_steps}")
    need(at is None or 0 <= at < t.max_steps // s.local_steps, "trainer.faults.kill_in_collective_at", at,
         f"an outer round of this run (0..{t.max_steps // s.local_steps - 1})")
