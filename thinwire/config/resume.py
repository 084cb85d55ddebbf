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

Used by the static check (``thinwire.config.validate``, before any process starts) and by
the trainer's resume path (every rank, before any state is loaded), so both say the same.
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError

#: keys (or key prefixes, ending a dotted path) that may differ between a checkpoint's config
#: and the config resuming from it; every other key must be equal
SAFE_TO_CHANGE = (
    "run_dir",
    "dist",
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
)

_UNSET = "<unset>"


class ResumeConfigError(ConfigError):
    """The config differs from the checkpoint's in keys that cannot change on resume."""


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def as_dict(cfg: DictConfig | Mapping | str) -> dict:
    """A config as a plain dict: a DictConfig, a mapping, or its YAML text."""
    if isinstance(cfg, str):
        cfg = OmegaConf.create(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SAFE_TO_CHANGE)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def config_changes(saved: DictConfig | Mapping | str, current: DictConfig | Mapping | str) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key outside ``SAFE_TO_CHANGE`` whose
    value differs (a key only one side has counts, shown as ``<unset>``), sorted by key. A
    group whose option changed (``comm.name``, ``model._target_``) is that one entry: the
    keys of two different options are not comparable."""
    a, b = flatten(as_dict(saved)), flatten(as_dict(current))
    switched = {k.rsplit(".", 1)[0] for k in set(a) | set(b)
                if k.count(".") == 1 and k.endswith((".name", "._target_")) and not _same(a.get(k), b.get(k))}
    out = []
    for key in sorted(set(a) | set(b)):
        if is_safe(key):
            continue
        group, _, rest = key.partition(".")
        if group in switched and rest not in ("name", "_target_"):
            continue
        old, new = a.get(key, _UNSET), b.get(key, _UNSET)
        if not _same(old, new):
            out.append((key, old, new))
    return out


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else OmegaConf.to_yaml(v).strip() if isinstance(v, (list, dict)) else repr(v)
    text = " ".join(str(text).split())
    return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``comm.name (topk -> int8), optim.lr (0.001 -> 0.002)``, at most ``limit`` keys."""
    shown = ", ".join(f"{k} ({_show(old)} -> {_show(new)})" for k, old, new in changes[:limit])
    more = len(changes) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def check_decay_branch(saved: Mapping, current: Mapping, step: int) -> str | None:
    """Why a changed ``optim.decay_start`` cannot be taken at ``step`` (None: it can): the
    checkpoint must lie at or before the decay start of both configs."""
    from ..optim.schedule import decay_start_of

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
