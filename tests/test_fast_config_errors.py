"""Config errors reach the user fast and name the key that causes them (issue 36 item 4).

The refusal time itself (<= 3 s on an idle machine, median of 5; docs/reliability.md has the
numbers and the command, tools/config_error_times.py) is too noisy to assert on a shared CI
machine: instead the error path must not import the heavy optional stacks (each takes seconds:
wandb, transformers, deepspeed, ...), nor torch's compiler and launcher, and, once a full
compose has left its snapshot of the schemas (``thinwire.config.fast``), not torch at all,
with the same line as the full path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thinwire.errors import ConfigError
from thinwire.models.gpt import GPTOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("wandb", "transformers", "deepspeed", "peft", "accelerate", "lightning", "datasets", "triton",
         "torch._dynamo", "torch._inductor", "torch.distributed.elastic", "torch.distributed.fsdp")
REFUSED = ("comm=nosuch", "trainer.max_steps=-5", "optim.lr=inf", "model.block_size=100000000")

PROBE = """
import contextlib, io, json, sys
from thinwire.train import main
out = {}
for arg in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([arg])
        except SystemExit as e:
            code = e.code
    out[arg] = {"code": code, "stderr": err.getvalue()}
out["heavy"] = [m for m in %r if m in sys.modules]
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
""" % (HEAVY,)


@pytest.mark.slow
def test_config_errors_import_no_heavy_module(tmp_path):
    """The first refusal takes the full path (torch, the registries) and leaves the snapshot;
    the next ones, in a fresh process, import no torch and say the same lines."""
    env = {**os.environ, "WANDB_MODE": "disabled", "THINWIRE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("THINWIRE_CONFIG_CACHE", None)
    runs = []
    for _ in ("full", "fast"):
        p = subprocess.run([sys.executable, "-c", PROBE, *REFUSED], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    full, fast = runs
    for arg in REFUSED:
        assert full[arg]["code"] == 2, (arg, full[arg])
        line = full[arg]["stderr"].strip()
        assert line.startswith("thinwire-train: error: ") and len(line.splitlines()) == 1, (arg, line)
        assert fast[arg] == full[arg], arg
    assert "model.block_size=100000000" in full["model.block_size=100000000"]["stderr"]
    assert full["heavy"] == [] and fast["heavy"] == [], f"the config-error path imported {full['heavy']}"
    assert full["torch"] and not fast["torch"], "the second process took the full path (or the first did not)"


def test_a_huge_block_size_is_refused_naming_block_size():
    o = GPTOptions(block_size=100_000_000)
    if not o.n_params() * 16 > (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")):
        pytest.skip("a machine with more than 200 GB of memory")
    with pytest.raises((ConfigError, ValueError), match=r"^block_size=100000000: .*position table"):
        o.check()


def test_a_deep_model_is_still_refused_naming_n_layer():
    with pytest.raises((ConfigError, ValueError), match=r"^n_layer=1000000: with n_embd=128"):
        GPTOptions(n_layer=1_000_000).check()


def _same_refusals(cases, tmp_path, monkeypatch) -> int:
    """compose + validate over the snapshot (``fast.refuse``) either steps aside or raises the
    line the registries' path raises, for each case (overrides, setup); how many it refused."""
    from thinwire.config import compose, fast, validate

    compose([])  # the registries, as the CLI's full path has them when it writes the snapshot
    loaded = fast.table(json.loads(json.dumps(fast.snapshot())))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    refused = 0
    for n, (overrides, setup) in enumerate(cases):
        d = tmp_path / str(n)
        d.mkdir()
        if setup is not None:
            setup(d)
        args = [a.replace("{tmp}", str(d)) for a in overrides]
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={d}/run")
        try:
            fast.refuse([args], loaded)
            said = None
        except ConfigError as e:
            said = str(e)
        try:
            validate(compose(args))
            full = None
        except ConfigError as e:
            full = str(e)
        if said is not None:
            refused += 1
            assert said == full, args
    return refused


def test_the_snapshot_refuses_as_the_registries_do(tmp_path, monkeypatch):
    cases = [[a] for a in REFUSED] + [["comm=topk", "comm.ratoi=0.1"], ["+comm.foo=1"], ["~comm"],
                                      ["trainer.max_steps=abc"], ["experiment=huge"], ["trainr.max_steps=3"],
                                      ["dist.backend=nccl2"], ["comm=topk", "comm.ratio=2"]]
    assert _same_refusals([(c, None) for c in cases], tmp_path, monkeypatch) >= 8


@pytest.mark.extended
def test_the_snapshot_refuses_every_bad_input_as_the_registries_do(tmp_path, monkeypatch):
    """Every bad input of tests/test_bad_inputs.py (~12 min at load 130 on 2 cores)."""
    from test_bad_inputs import CASES

    cases = [(c.values[0], c.values[2]) for c in CASES]
    assert _same_refusals(cases, tmp_path, monkeypatch) >= len(cases) // 2


def test_a_snapshot_of_other_code_is_not_used(tmp_path, monkeypatch):
    from thinwire.config import compose, fast

    monkeypatch.setenv("THINWIRE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("THINWIRE_CONFIG_CACHE", raising=False)
    compose([])
    data = fast.snapshot()
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh process (enabled() asks)
    with open(fast.path(), "w") as fh:
        json.dump({**data, "fingerprint": "other code"}, fh)
    assert fast.load_table() is None
    with open(fast.path(), "w") as fh:
        json.dump(data, fh)
    assert fast.load_table() is not None
    monkeypatch.setenv("THINWIRE_CONFIG_CACHE", "0")
    assert fast.load_table() is None
