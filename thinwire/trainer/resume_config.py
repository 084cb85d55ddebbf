"""The resume-config check: a run continues only under the config its checkpoint was written with.

A checkpoint's ``common.pt`` holds the resolved run config as YAML (``"config"``). Resuming
under a different model, data set, compressor, sync strategy, optimizer, PEFT method, engine
or seed would load state into a model or buffers it does not belong to (a KeyError deep in a
``load_state_dict``), or, worse, run on with it (``comm=topk`` -> ``comm=int8`` keeps the old
error-feedback buffers). :func:`check_resume_config` compares the two configs key by key and
refuses every change except the documented safe ones (``SAFE_TO_CHANGE``), with one line
naming each differing key, its old and its new value.

Safe to change on resume: how long the run is and what it records, not what it computes:
``trainer.max_steps`` (continuing a run, or starting a decay branch from a checkpoint),
the evaluation / checkpoint / log cadence, retention, ``trainer.stop_after``,
``trainer.resume`` itself, the logger, ``dist.*`` (the launch: a different world size is
its own policy, see ``thinwire.trainer.checkpoint``), fault drills and the run dir.

``optim.decay_start`` (``optim.schedule=wsd``) may change too, when the checkpoint's step is
at or before both the old and the new decay start: every step already taken ran at the
same constant LR under either config, so the resumed run is the run configured with the new
decay from the start. That is how a *decay branch* starts from a constant-LR run's
checkpoint (``thinwire.optim.schedule``); a checkpoint already inside a decay is refused.

Used by the one walk over the checkpoints (``thinwire.trainer.resume``), before any process
starts and on every rank before any state is loaded, so both say the same.
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ..configdiff import as_dict, changes, describe_changes, flatten  # noqa: F401 - re-exported
from ..errors import ResumeConfigError  # noqa: F401 - raised here, defined in the bottom layer
from ..optim.schedule import decay_start_of

#: keys (or key prefixes, ending a dotted path) that may differ between a checkpoint's config
#: and the config resuming from it; every other key must be equal
SAFE_TO_CHANGE = (
    "run_dir",
    "dist",
    "elastic",  # the membership layer of the launch (absent from checkpoints of earlier versions)
    "logger",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.keep_checkpoints",
    "trainer.drift_check_every",
    "trainer.stop_after",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.trust_checkpoints",
    "trainer.progress",
    "trainer.sample_chars",
    "trainer.max_skipped_steps",
    "trainer.faults",
    "optim.decay_start",  # only at or before the decay: see check_decay_branch
    "engine.shard_group_size",  # engine=fsdp2 reshards (or refuses, one line) in its load_extra
)

def is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SAFE_TO_CHANGE)


def config_changes(saved: DictConfig | Mapping | str, current: DictConfig | Mapping | str) -> list[tuple[str, Any, Any]]:
    """``changes`` (``thinwire.configdiff``) outside ``SAFE_TO_CHANGE``."""
    return changes(saved, current, safe=is_safe)


def check_decay_branch(saved: Mapping, current: Mapping, step: int) -> str | None:
    """Why a changed ``optim.decay_start`` cannot be taken at ``step`` (None: it can): the
    checkpoint must lie at or before the decay start of both configs."""
    def start(cfg: Mapping) -> int | None:
        o = cfg.get("optim", {})
        if o.get("schedule") != "wsd":
            return None
        return decay_start_of(int(cfg["trainer"]["max_steps"]), o.get("decay_start"), int(o.get("warmup_steps", 0)))

    old, new = start(saved), start(current)
    if saved.get("optim", {}).get("decay_start") == current.get("optim", {}).get("decay_start"):
        return None
    if old is None or new is None or step > min(old, new):
        return (f"optim.decay_start ({saved.get('optim', {}).get('decay_start')} -> "
                f"{current.get('optim', {}).get('decay_start')}): a decay branch starts from a checkpoint at or "
                f"before the decay of optim.schedule=wsd (this one is at step {step}, decay starts "
                f"{'(not wsd)' if old is None or new is None else f'at {old} -> {new}'})")
    return None


def check_resume_config(saved: DictConfig | Mapping | str, current: DictConfig | Mapping | str,
                        checkpoint: str, resume: str, step: int | None = None) -> None:
    """Raise :class:`ResumeConfigError` (one line) if ``current`` changes a key that a resume
    must keep; ``checkpoint`` is the directory the saved config came from, ``step`` its step
    (None: unknown, so a changed ``optim.decay_start`` is refused)."""
    changes = config_changes(saved, current)
    branch = check_decay_branch(as_dict(saved), as_dict(current), (1 << 62) if step is None else step)
    if branch:
        raise ResumeConfigError(f"trainer.resume={resume}: the checkpoint {checkpoint}: {branch}")
    if changes:
        raise ResumeConfigError(
            f"trainer.resume={resume}: the checkpoint {checkpoint} was written with a different config: "
            f"{describe_changes(changes)}; resume with the checkpoint's values (only trainer.max_steps, "
            f"eval/checkpoint/log cadence, logger, dist.* and the like may change), or start a new run "
            f"in another hydra.run.dir")
