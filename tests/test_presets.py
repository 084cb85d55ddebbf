"""Every ``experiment=`` preset learns in 20 steps on the pooled ranks, and classifiers log
``val_accuracy``.

The small presets (``default``'s char-GPT under ``tiny``, ``digits``, ``sparseloco``): the
logged training loss falls (mean of the last 5 steps below the first 5).

The pretrained MiniLM presets (2 ranks x their 16 lines a step; ``minilm_genre`` 8, where the
check holds as well at half the cost of its backprop steps): a single line's genre is a hard,
noisy task; the logged loss of 5-step windows moves by +-0.03 from batch to batch, more
than 20 steps gain, and the held-out loss after 20 steps rose for two seeds in five
(``minilm_genre``) and for one (``minilm_lora_ga``). So the check is the loss, in eval mode, on the 20
steps' own training batches (both ranks') of the untrained model (the pretrained
encoder with the new, random head that the seed builds) against the run's checkpoint at step
20: the same batches before and after, no batch-to-batch noise. It fails when a preset's
optimizer does not descend its objective (a learning rate too small to move it, a divergence,
a frozen head). MARGIN is half of each preset's smallest fall over seeds 0-4 (``python
bench/presets.py --check-seeds 0,1,2,3,4``, bench/results/presets_check.md; docs/presets.md,
"The CI check"). For ``minilm_mezo`` the fall is the class-means head's
(``peft.head_init=class_means``): MeZO's own steps move the loss by less than 0.001 in a CPU's
budget; the MeZO update is checked in tests/test_optim_zo.py, the head in
tests/test_head_init.py."""
from __future__ import annotations

import json
import os

import pytest

from bench.harness.presets import CHECK_RANKS, CHECK_STEPS, check_args, fixed_batch_loss
from conftest import REPO

PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "experiment")) if f.endswith(".yaml"))
MINILM = [p for p in PRESETS if p.startswith("minilm")]
CLASSIFIERS = ("digits", "minilm_genre", "minilm_lora_ga", "minilm_mezo")
RUN = ["trainer.sample_chars=0", "trainer.progress=false", "logger=none"]
# the fall on the 20 steps' batches must exceed this (module docstring)
MARGIN = {"minilm_genre": 0.04, "minilm_lora_ga": 0.01, "minilm_mezo": 0.009}


def train_rows(pools, tmp_path, *args: str) -> list[dict]:
    pools.train(*args, f"trainer.max_steps={CHECK_STEPS}", f"trainer.eval_every={CHECK_STEPS}",
                f"trainer.checkpoint_every={CHECK_STEPS}", *RUN, f"hydra.run.dir={tmp_path}")
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, CHECK_STEPS + 1))
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e4 for r in rows), rows  # finite
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in MINILM])
def test_preset_learns_in_20_steps(pools, tmp_path, preset):
    rows = train_rows(pools, tmp_path, f"experiment={preset}", "data.eval_batches=2")
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert ("val_accuracy" in rows[-1]) == (preset in CLASSIFIERS), rows[-1]


def _rank_loss(rank: int, world_size: int, args: list[str], run_dir):
    return fixed_batch_loss(args, CHECK_STEPS, world_size, run_dir, only_rank=rank)


def batch_loss(pools, tmp_path, args: list[str], run_dir=None) -> float:
    """``fixed_batch_loss`` over both ranks' batches, each rank of the pool evaluating its own
    (the same number of batches each: the mean of the two means)."""
    losses = pools.call(_rank_loss, CHECK_RANKS, tmp_path, args, run_dir)
    return sum(losses) / len(losses)


_untrained: dict[str, float] = {}


def untrained(pools, tmp_path, args: list[str]) -> float:
    """``batch_loss`` of the untrained model, once per model, data and seed (the MiniLM presets
    share them: the same encoder, random head and training batches)."""
    from omegaconf import OmegaConf

    from thinwire.config import compose

    cfg = compose(args)
    key = OmegaConf.to_yaml({"model": cfg.model, "data": cfg.data, "seed": cfg.trainer.seed})
    if key not in _untrained:
        _untrained[key] = batch_loss(pools, tmp_path, args)
    return _untrained[key]


@pytest.mark.slow
@pytest.mark.extended  # ~60 s for the three: the default tier checks the char presets the same way
@pytest.mark.parametrize("preset", MINILM)
def test_minilm_preset_learns_in_20_steps(pools, tmp_path, preset):
    """20 steps of the preset as shipped (its learning rate, head init, adapters; the batch size
    of ``check_args``) lower the loss on those steps' batches by more than MARGIN below the
    untrained model's, and
    the run logs ``val_accuracy`` (2 validation batches suffice for that: evaluation changes
    nothing the check measures)."""
    args = check_args(preset)
    before = untrained(pools, tmp_path, args)
    last = train_rows(pools, tmp_path, *args, "data.eval_batches=2")[-1]
    assert "val_accuracy" in last, last
    after = batch_loss(pools, tmp_path, args, str(tmp_path))
    assert after < before - MARGIN[preset], (preset, before, after)
