"""``trainer``: the run's length, evaluation, checkpoints and faults (the options of the
training loop, ``thinwire.trainer.loop``; a fixed config group, one schema for every preset)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..errors import need, non_negative, positive
from .fault_config import FaultConfig

MAX_SEED = 1 << 32                # seeds are mixed (seed * 1_000_003 + ...) into torch's 64-bit seeds
MAX_SAMPLE_CHARS = 10_000


@dataclass
class TrainerConfig:
    """``trainer``: the run's length, evaluation, checkpoints and faults."""
    max_steps: int = 600             # the run's length; fixes the LR schedule
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 200
    # none: a new run (refused where the run dir already holds one) | auto: continue from the
    # newest checkpoint that loads | <path to a checkpoint directory>
    resume: str = "none"
    overwrite: bool = False          # resume=none over an existing run: move it to <run dir>/previous/ first
    stop_after: Optional[int] = None  # end the process after this step, with a checkpoint
    log_every: int = 1
    progress: bool = True
    sample_chars: int = 200          # generated at the end (char LM only); 0 = none
    max_skipped_steps: int = 10      # consecutive non-finite steps before giving up
    keep_checkpoints: int = 3        # keep only the newest N checkpoints; 0 = keep all
    # replica-drift guard: hash the state every rank must hold bitwise equal every N steps (at a
    # round boundary); null = once per outer round, or every 100 steps under sync=ddp; 0 = off
    drift_check_every: Optional[int] = None
    # load checkpoint files whose loader unpickles arbitrary objects (engine=deepspeed: DeepSpeed's
    # own files); only for checkpoints you wrote yourself. thinwire's own files always load safely
    trust_checkpoints: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        positive(self, "max_steps", "eval_every", "checkpoint_every", "log_every")
        need(0 <= self.seed < MAX_SEED, "seed", self.seed, f"must be an int in [0, {MAX_SEED}) (2**32)")
        need(self.sample_chars <= MAX_SAMPLE_CHARS, "sample_chars", self.sample_chars,
             f"must be at most {MAX_SAMPLE_CHARS} (one forward pass per character)")
        need(self.stop_after is None or self.stop_after > 0, "stop_after", self.stop_after, "must be positive or null")
        non_negative(self, "max_skipped_steps", "sample_chars")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0 = keep all)")
        need(self.drift_check_every is None or self.drift_check_every >= 0, "drift_check_every",
             self.drift_check_every, "must be >= 0 (0 = off) or null (auto)")
        need(self.resume in ("none", "auto") or os.sep in self.resume or os.path.exists(self.resume), "resume",
             self.resume, "expected none, auto or a checkpoint directory")
        need(not self.overwrite or self.resume == "none", "overwrite", self.overwrite,
             f"starts a new run, so it needs resume=none (not {self.resume})")
        faults = self.faults if isinstance(self.faults, FaultConfig) else FaultConfig(**self.faults)
        faults.check()
