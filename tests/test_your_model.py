"""docs/your_model.md: a user's own model and data set, as the page shows them.

Every ``thinwire-train`` command of the page is trained for a few steps from
docs/examples/ (where ``my_project`` lives) on the pooled ranks, and must learn; the page's
error lines are exactly what the CLI prints for the mistakes they show (one line, exit 2)."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys

import pytest

from conftest import REPO, cli_error, run_ranks

EXAMPLES = os.path.join(REPO, "docs", "examples")
DOC = os.path.join(REPO, "docs", "your_model.md")
# the page's error block, line by line: the command line that gives each
MISTAKES = [
    ["model._target_=my_projec.models.build_cnn", "data=digits"],
    ["model._target_=my_project.models.build_cn", "data=digits"],
    ["model._target_=my_project.models.SmallCNN", "data=digits"],
    ["model._target_=my_project.models.build_cnn", "data=digits", "model.chanels=8"],
    ["model._target_=my_project.models.build_cnn", "data=digits", "model.channels=x"],
    ["model._target_=my_project.models.build_hf_causal_lm", "data._target_=my_project.data.TextFiles"],
]


def _add_path(rank, world_size, path):
    if path not in sys.path:
        sys.path.append(path)


@pytest.fixture
def in_examples(monkeypatch, tmp_path):
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.syspath_prepend(EXAMPLES)
    for n in (1, 2):  # the pooled ranks import my_project as spawned workers would (cwd on sys.path)
        run_ranks(_add_path, n, tmp_path, EXAMPLES)
    yield
    for name in [m for m in sys.modules if m == "my_project" or m.startswith("my_project.")]:
        del sys.modules[name]


def page(kind: str) -> list[str]:
    text = open(DOC).read()
    blocks = re.findall(rf"```{kind}\n(.*?)```", text, re.S)
    return [ln for b in blocks for ln in (re.sub(r"\s+#.*$", "", x).strip() for x in b.splitlines()) if ln]


def test_errors_are_the_pages_lines(in_examples, capsys, tmp_path):
    shown = page("text")
    assert len(shown) == len(MISTAKES)
    for argv, line in zip(MISTAKES, shown):
        code, err = cli_error(capsys, *argv, f"hydra.run.dir={tmp_path}")
        assert code == 2 and err == line, (argv, err)


@pytest.mark.extended  # docs/your_model.md's commands: four runs, one a Hugging Face model
@pytest.mark.slow  # four short training runs, one a Hugging Face model
def test_pages_commands_train(in_examples, pools, tmp_path):
    commands = [c for c in page("bash") if not c.startswith("cd ")]
    assert len(commands) == 4
    for n, cmd in enumerate(commands):
        argv = shlex.split(cmd)
        assert argv[0] == "thinwire-train"
        run_dir = tmp_path / f"run{n}"
        run = pools.train(*argv[1:], "trainer.max_steps=30", "trainer.eval_every=10", "trainer.sample_chars=0",
                          "trainer.progress=false", "logger=none", "data.eval_batches=4",
                          f"optim.lr={1e-2 if 'build_cnn' in cmd else 3e-3}",
                          f"hydra.run.dir={run_dir}")
        rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
        evals = [r for r in rows if "val_loss" in r]
        assert [r["step"] for r in evals] == [10, 20, 30], cmd
        assert evals[-1]["val_loss"] < evals[0]["val_loss"] < rows[0]["loss"] + 0.5, (cmd, evals)
        if "build_cnn" in cmd:  # a classifier: accuracy logged, rising, twice chance (0.1) after 30 steps
            acc = [r["val_accuracy"] for r in evals]
            assert acc[-1] > max(acc[0], 0.2), acc
        else:
            assert "val_accuracy" not in evals[-1]
        assert run.record["step"] == 30
