"""What rank 0 shows on the console while a run starts, trains and stops.

- start-up phases (``thinwire: building the model (3.1 s)``), so a slow start is never a blank
  screen, then the tqdm bar;
- the bar's postfix: the step's loss, throughput, the newest ``val_loss`` (and
  ``val_accuracy`` for classifiers), and the wire MB/step averaged over the last
  ``WINDOW`` steps: under ``sync=local|co2`` only every H-th step sends, so the last step's
  figure alone flickers between 0 and the round's bytes;
- the command that continues the run (``trainer.resume=auto``), printed when it stops
  before ``trainer.max_steps`` (``trainer.stop_after``, Ctrl-C, which stops every rank after
  the same step with a checkpoint: :class:`StopRequest`).

The command line the user typed reaches the workers as ``THINWIRE_COMMAND`` (set by
``thinwire.train.main``).
"""
from __future__ import annotations

import collections
import os
import shlex
import signal
import sys
import threading
import time

from tqdm import tqdm

WINDOW = 32  # steps of the running mean of wire MB/step: longer than any usual sync.local_steps
COMMAND_ENV = "THINWIRE_COMMAND"


class Progress:
    """Rank 0's console output of one run (silent on other ranks and with ``progress=false``,
    except the start-up phases and the final lines, which ``progress=false`` keeps)."""

    def __init__(self, total: int, main: bool, bar: bool, unit: str = "tokens"):
        self.total, self.main, self.show_bar, self.unit = total, main, main and bar, unit
        self.t0 = time.perf_counter()
        self.bar = None
        self.wire: collections.deque = collections.deque(maxlen=WINDOW)
        self.val: dict = {}

    def phase(self, what: str) -> None:
        """A start-up phase begins: said at once, with the time since the worker started."""
        if self.main:
            print(f"thinwire: {what} ({time.perf_counter() - self.t0:.1f} s)", flush=True)

    def start(self, initial: int, unit: str) -> None:
        self.unit = unit
        self.bar = tqdm(total=self.total, initial=initial, disable=not self.show_bar, dynamic_ncols=True,
                        mininterval=0.5)

    def step(self, record: dict) -> None:
        self.wire.append(record.get("wire_bytes", 0))
        for key in ("val_loss", "val_accuracy"):
            if key in record:
                self.val[key] = record[key]
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(self.postfix(record), refresh=False)

    def postfix(self, record: dict) -> str:
        parts = [f"loss {record['loss']:.3f}"]
        if "val_loss" in self.val:
            parts.append(f"val {self.val['val_loss']:.3f}")
        if "val_accuracy" in self.val:
            parts.append(f"acc {self.val['val_accuracy']:.3f}")
        rate = record.get(f"{self.unit}_per_s")
        if rate is not None:
            parts.append(f"{rate:.0f} {self.unit}/s")
        parts.append(f"wire {self.mean_wire_mb():.3f} MB/step")
        return " | ".join(parts)

    def mean_wire_mb(self) -> float:
        """Mean wire MB per step over the last ``WINDOW`` steps."""
        return sum(self.wire) / max(len(self.wire), 1) / 1e6

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resume_command(run_dir: str, argv: list[str] | None = None) -> str:
    """The command that continues the run in ``run_dir``: the user's own command line
    (``THINWIRE_COMMAND``, else ``thinwire-train``) with its run dir pinned and
    ``trainer.resume=auto``, without ``trainer.stop_after`` or ``trainer.overwrite``."""
    if argv is None:
        text = os.environ.get(COMMAND_ENV)
        argv = shlex.split(text) if text else ["thinwire-train"]
    drop = ("trainer.resume=", "hydra.run.dir=", "trainer.stop_after=", "trainer.overwrite=")
    kept = [a for a in argv if not a.lstrip("+").startswith(drop)]
    return shlex.join([*kept, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])


def say_stopped(run_dir: str, step: int | None, why: str, checkpoint: str | None) -> None:
    """One line: where the run stopped, its newest checkpoint, and how to continue it."""
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
    at = f" at step {step}" if step is not None else ""
    print(f"thinwire: stopped{at} ({why}); {where}; continue with: {resume_command(run_dir)}",
          file=sys.stdout, flush=True)


class StopRequest:
    """Ctrl-C (SIGINT) while training. Where the ranks can stop together (``graceful``: one
    rank, or several that agree every step, ``Trainer.stops_together``) the first Ctrl-C is
    noted and the run stops after a step that every rank agrees on, with a checkpoint of it
    on every rank; a second one (after a second: the launcher passes the user's own Ctrl-C on
    to its workers too) interrupts at once. With several ranks the request travels in the
    step's control all-reduce (``Trainer.agree``), or under local updates / CO2 in the next
    synchronisation's (``SyncStrategy.carries_stop``), so no rank stops a step early and none
    waits for another: a terminal's Ctrl-C reaches the workers at slightly different points
    of a step, and the self-launcher (torch's elastic agent) forwards it as SIGINT, waiting
    up to its shutdown timeout before it kills them. Otherwise Ctrl-C interrupts at once and
    the run continues from its newest periodic checkpoint (``thinwire.train.worker`` says which)."""

    def __init__(self, graceful: bool, main: bool = True, when: str = "after this step"):
        self.requested, self.previous, self.main, self.when = 0.0, None, main, when  # requested: the first's time
        if graceful and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self.requested > 1.0:  # not the launcher passing the first one on
                raise KeyboardInterrupt
            return
        self.requested = time.monotonic()
        if self.main:
            try:
                print(f"\nthinwire: Ctrl-C: stopping {self.when}, with a checkpoint (Ctrl-C again: stop now)",
                      flush=True)
            except RuntimeError:  # the signal came in the middle of another print (reentrant call)
                pass

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
