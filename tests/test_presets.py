"""Every ``experiment=`` preset trains: 20 steps each on the pooled ranks (the pretrained
MiniLM ones with 8 lines per batch), the training loss falls (mean of the last 5 steps below
the first 5) and classifiers log ``val_accuracy``. ``minilm_mezo`` (zeroth order: 20 steps of
lr 1e-5 move the loss less than its batch-to-batch noise) is only checked to run and log
accuracy; its learning is measured in docs/optim.md."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO

PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "experiment")) if f.endswith(".yaml"))
CLASSIFIERS = ("digits", "minilm_genre", "minilm_lora_ga", "minilm_mezo")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_learns_in_20_steps(pools, tmp_path, preset):
    small = ["data.batch_size=8"] if preset.startswith("minilm") else []
    pools.train(f"experiment={preset}", "trainer.max_steps=20", "trainer.eval_every=20", "trainer.sample_chars=0",
                "trainer.checkpoint_every=20", "trainer.progress=false", "logger=none", "data.eval_batches=2",
                *small, f"hydra.run.dir={tmp_path}")
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 20
    if preset != "minilm_mezo":
        assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert ("val_accuracy" in rows[-1]) == (preset in CLASSIFIERS), rows[-1]
