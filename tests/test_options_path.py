"""One options path: a bad value is refused with the same one line whichever way it comes
in: the command line (compose + validate, what thinwire-train runs), ``thinwire.OuterLoop``,
``comm_hook`` and ``build_compressor`` (which heads the line with the compressor's name
instead of its group: ``thinwire.errors.in_group`` maps one to the other)."""
import math

import pytest
import torch

from thinwire import OuterLoop
from thinwire.comm import build_compressor, comm_hook
from thinwire.config import compose, validate
from thinwire.errors import ConfigError, in_group

COMM = [  # (compressor, key, value, the one line)
    ("topk", "ratio", 1.5, "comm.ratio=1.5: must be a number in (0, 1]"),
    ("topk", "ratio", -0.5, "comm.ratio=-0.5: must be a number in (0, 1]"),
    ("topk", "ratio", math.inf, "comm.ratio=inf: must be a finite number"),
    ("randk", "ratio", math.nan, "comm.ratio=nan: must be a finite number"),
    ("chunk_topk", "k", 0, "comm.k=0"),
    ("int8", "block_size", 1, "comm.block_size=1"),
]


def cli(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose(list(overrides)))
    return str(e.value)


def raised(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name,key,value,line", COMM, ids=[f"{c[0]}.{c[1]}={c[2]}" for c in COMM])
def test_a_bad_comm_value_is_one_line_everywhere(name, key, value, line):
    model = torch.nn.Linear(2, 2)
    via = {
        "cli": cli(f"comm={name}", f"comm.{key}={value}"),
        "comm_hook": raised(lambda: comm_hook(name, **{key: value})),
        "OuterLoop": raised(lambda: OuterLoop(model, "local", comm={"name": name, key: value})),
        "build_compressor": str(in_group("comm", ValueError(raised(lambda: build_compressor(name, **{key: value}))))),
    }
    assert all(m.startswith(line) for m in via.values()), via
    assert len(set(via.values())) == 1, via


SYNC = [  # (strategy, key, value, the one line)
    ("local", "local_steps", 0, "sync.local_steps=0: must be >= 1"),
    ("local", "fragments", 3, "sync.fragments=3: must divide local_steps=4"),
    ("co2", "clip", -1.0, "sync.clip=-1.0"),
    ("local", "outer_optim.lr", math.inf, "sync.outer_optim.lr=inf: must be a finite number"),
]


@pytest.mark.parametrize("name,key,value,line", SYNC, ids=[f"{c[0]}.{c[1]}={c[2]}" for c in SYNC])
def test_a_bad_sync_value_is_one_line_everywhere(name, key, value, line):
    model = torch.nn.Linear(2, 2)
    options = {"local_steps": 4} if key == "fragments" else {}
    if "." in key:
        outer, inner = key.split(".")
        options[outer] = {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True, inner: value}
    else:
        options[key] = value
    overrides = [f"sync.{k}={v}" for k, v in options.items() if not isinstance(v, dict)]
    via = {
        "cli": cli(f"sync={name}", *overrides, f"sync.{key}={value}"),
        "OuterLoop": raised(lambda: OuterLoop(model, name, **options)),
    }
    assert all(m.startswith(line) for m in via.values()), via
    assert len(set(via.values())) == 1, via


def test_inf_where_an_option_allows_it_passes_everywhere():
    validate(compose(["sync=local", "sync.clip=inf"]))
    with OuterLoop(torch.nn.Linear(2, 2), "local", clip=math.inf) as outer:
        assert outer.cfg.clip == math.inf


def test_feedback_rules_own_their_keys():
    """A rule that reuses another rule's key with another default (a third party's ``eta``)
    no longer breaks every comm config: each rule gets its own default."""
    from dataclasses import dataclass

    from thinwire.comm import feedback as fb

    @dataclass
    class TwinConfig:
        eta: float = 0.5

    class Twin(fb.Feedback):
        Config = TwinConfig

    fb.FEEDBACKS.register("eta_twin")(Twin)
    try:
        shared = fb.defaults(fb.feedback_options())
        assert shared["eta"] is None and shared["ef_decay"] == 1.0
        assert fb.build_feedback("eta_twin", **shared).eta == 0.5
        assert fb.build_feedback("ef21m", **shared).eta == 0.1
        assert fb.build_feedback("ef21m", **{**shared, "eta": 0.3}).eta == 0.3
        fb.check_feedback_options("eta_twin", shared)
    finally:
        fb.FEEDBACKS._items.pop("eta_twin")
