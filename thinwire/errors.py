"""User errors and the check helpers every part uses for its own options.

A :class:`ConfigError` is a mistake in the user's config: the command line prints it as one
line (naming the key and the value) and exits with status 2. Parts check their own options
with keys relative to their config group (``ratio``, not ``comm.ratio``); the assembler
(``thinwire.config``) adds the group, so a part does not need to know where it is mounted.
This module is the bottom layer: it imports nothing from thinwire.
"""
from __future__ import annotations

import re


class ConfigError(ValueError):
    """A user error in the config: reported as one line, exit status 2.

    ``agreed=True``: every rank raised the same error from the same inputs (a collective
    decided it), so the launcher prints it once, not once per rank."""

    def __init__(self, msg: str = "", *, agreed: bool = False):
        super().__init__(msg)
        self.agreed = agreed

    def __reduce__(self):  # keep ``agreed`` across processes (pickle passes only args to __init__)
        return self.__class__, self.args, {"agreed": self.agreed}


class ResumeConfigError(ConfigError):
    """Saved state (a checkpoint, a comm hook's state) was written under another config, in
    keys that cannot change on resume."""


class ReplicaDriftError(RuntimeError):
    """Replicas that must hold the same consensus state do not (the drift guard,
    ``thinwire.trainer.drift``; over an elastic run's live set, ``thinwire.elastic.protocol``):
    not a config error, and no rank knows which copy is right, so the run stops."""


def one_line(msg) -> str:
    """Collapse a multi-line library message (Hydra, OmegaConf) into one line."""
    msg = re.sub(r"\s*\n\s*", " ", str(msg)).strip()
    return re.sub(r"\s{2,}", " ", msg)


def need(cond: bool, key: str, value, why: str) -> None:
    """Raise ``ConfigError("<key>=<value>: <why>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value}: {why}")


def positive(obj, *keys: str) -> None:
    """Every named option of ``obj`` (a dataclass or config node) is a number > 0."""
    for k in keys:
        v = getattr(obj, k)
        need(v is not None and v > 0, k, v, "must be positive")


def non_negative(obj, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        need(v is not None and v >= 0, k, v, "must be >= 0")


def one_of(value, options, key: str) -> None:
    need(value in options, key, value, f"expected one of {', '.join(map(str, options))}")


def in_group(group: str, err: Exception) -> ConfigError:
    """``err`` (a part's own ConfigError or ValueError, keyed relative to its options) as a
    ConfigError keyed in ``group``: ``ratio=2: ...`` becomes ``comm.ratio=2: ...``. Messages
    of the form ``<option name>: <key>=<value> ...`` (the compressors' ValueErrors) lose the
    option name, which the group key replaces."""
    msg = str(err)
    m = re.match(r"^[\w.-]+: (?=[\w.]+=)", msg)
    if m:
        msg = msg[m.end():]
    msg = re.sub(r"^([\w.]+=\S*[^:\s]) (?=must |expected )", r"\1: ", msg)  # "key=v must ..." -> "key=v: must ..."
    if msg.startswith(f"{group}.") or msg.startswith(f"{group}="):
        return ConfigError(msg)
    if re.match(r"^[\w.]+=", msg):
        return ConfigError(f"{group}.{msg}")
    return ConfigError(f"{group}: {msg}")
