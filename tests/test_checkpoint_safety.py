"""What a checkpoint may hold and what may reach one (issue 14 items 3 and 4): a crafted
pickle in a checkpoint never runs (every file loads with torch.load(weights_only=True));
an earlier version's checkpoint (numpy RNG state as an array) still loads; DeepSpeed's own
loader, which unpickles, needs trainer.trust_checkpoints=true; inf in any float option is
refused up front; parameters that overflowed are never checkpointed."""
import os
import re

import numpy as np
import pytest
import torch

from conftest import cli_error
from thinwire.config import ConfigError, compose, to_yaml, validate

TINY = ["experiment=tiny", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=4"]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def craft(path, marker):
    """Replace a checkpoint file by one whose unpickling would create ``marker``."""
    torch.save({"step": 4, "model": {}, "x": Payload(marker)}, path)


def test_a_crafted_checkpoint_never_runs_code(pools, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    pools.train(*TINY, f"hydra.run.dir={run}")
    newest = run / "checkpoints" / "step_00000004"

    # a crafted rank file in the newest checkpoint: refused, the run falls back to step 2
    craft(newest / "rank00001.pt", marker)
    out = pools.train(*TINY, "trainer.max_steps=6", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert not marker.exists()
    assert re.search(r"step_00000004 is unusable \(rank 1: rank00001.pt is refused: loading it would call "
                     r"(io|builtins)\.open \(a checkpoint holds tensors and plain data only\)\)", out.stdout), out.stdout
    assert "at step 2" in out.stdout

    # a crafted common file given as trainer.resume=<path>: one line, exit 2, before any process
    craft(newest / "common.pt", marker)
    code, err = cli_error(capsys, *TINY, f"trainer.resume={newest}", f"hydra.run.dir={tmp_path / 'other'}")
    assert code == 2 and not marker.exists()
    assert re.fullmatch(f"thinwire-train: error: trainer.resume={newest}: common.pt is refused: loading it would "
                        r"call (io|builtins)\.open \(a checkpoint holds tensors and plain data only\)", err), err


def test_an_earlier_versions_checkpoint_with_a_numpy_rng_state_still_loads(tmp_path):
    from thinwire.trainer.checkpoint import safe_load, set_rng_state

    np.random.seed(7)
    old = {"rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                   "numpy": np.random.get_state()}}  # as version 1 wrote it: an ndarray inside
    torch.save(old, tmp_path / "rank00000.pt")
    expected = np.random.rand(3)
    loaded = safe_load(str(tmp_path / "rank00000.pt"))
    set_rng_state(loaded["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_deepspeed_checkpoints_need_an_explicit_trust_flag(pools, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    pools.train(*TINY, "trainer.max_steps=2", f"hydra.run.dir={run}")
    with pytest.raises(ConfigError, match="engine=deepspeed checkpoints are read by the engine's own loader, "
                                          "which unpickles them .* set trainer.trust_checkpoints=true"):
        validate(compose([*TINY, "engine=deepspeed", "trainer.resume=auto", f"hydra.run.dir={run}"]))


INF = [
    (["optim.lr=inf"], "optim.lr=inf"),
    (["optim.weight_decay=-inf"], "optim.weight_decay=-inf"),
    (["dist.timeout_s=inf"], "dist.timeout_s=inf"),
    (["sync=local", "sync.outer_optim.lr=inf"], "sync.outer_optim.lr=inf"),
    (["sync=co2", "sync.staleness_penalty=inf"], "sync.staleness_penalty=inf"),
    (["comm=topk", "comm.ratio=inf"], "comm.ratio=inf"),
    (["optim.eps=nan"], "optim.eps=nan"),
]


@pytest.mark.parametrize("overrides,needle", INF, ids=[" ".join(o) for o, _ in INF])
def test_inf_in_a_float_option_is_refused_up_front(overrides, needle, capsys, tmp_path):
    code, err = cli_error(capsys, "experiment=tiny", *overrides, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err == f"thinwire-train: error: {needle}: must be a finite number"


def test_inf_where_an_option_means_off_is_accepted():
    validate(compose(["experiment=sparseloco"]))  # sync.clip=.inf: no clipping
    validate(compose(["sync=local", "sync.clip=inf"]))


def test_a_float_option_beyond_float32_is_refused(capsys, tmp_path):
    code, err = cli_error(capsys, "experiment=tiny", "optim.lr=1e300", f"hydra.run.dir={tmp_path}")
    assert code == 2 and err.startswith("thinwire-train: error: optim.lr=1e+300: must be a finite number (at most")


def save_with_a_poisoned_parameter(rank, world_size, cfg_yaml, poisoned_rank):
    """Build the trainer, put an inf into one parameter on ``poisoned_rank`` (as an update
    that overflowed would) and checkpoint: every rank must refuse, nothing written."""
    from thinwire.config import from_yaml
    from thinwire.trainer.loop import NonFiniteError, Trainer
    from thinwire.trainer.world import init_world

    trainer = Trainer(from_yaml(cfg_yaml), init_world("gloo", 120.0, 1))
    try:
        if rank == poisoned_rank:
            with torch.no_grad():
                dict(trainer.model.named_parameters())["ln_f.weight"][5] = float("inf")
        trainer.save(2)
    except NonFiniteError as e:
        return str(e)
    finally:
        trainer.close()
    return None


@pytest.mark.parametrize("sync", ["ddp", "local"])
def test_parameters_that_are_not_finite_are_never_checkpointed(pools, tmp_path, sync):
    """Under local updates the ranks' parameters differ: one rank's inf stops every rank."""
    run = tmp_path / "run"
    cfg = compose([*TINY, f"sync={sync}", f"hydra.run.dir={run}"])
    os.makedirs(run)
    errors = pools.call(save_with_a_poisoned_parameter, 2, tmp_path, to_yaml(cfg), 1)
    assert errors[0] and errors[1], errors
    for e in errors:
        assert e.startswith("parameter ln_f.weight is not finite at step 2 on rank 1: not checkpointed, "
                            "no checkpoint was written"), e
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_per_rank_state_read_from_a_file_moves_to_the_run_device_but_step_counters_stay():
    """Checkpoints load to the CPU; error-feedback buffers and the like must go where the
    gradients are (a GPU run resumed with them on the CPU failed at its first compressed step)."""
    from thinwire.tensors import on_device

    state = {"feedback": {"w": {"e": torch.ones(3)}}, "server_errors": [torch.zeros(2)],
             "outer": {"state": {0: {"step": torch.tensor(4.0), "momentum_buffer": torch.ones(2)}}}, "round": 3}
    moved = on_device(state, torch.device("meta"))
    assert moved["feedback"]["w"]["e"].device.type == "meta" and moved["server_errors"][0].device.type == "meta"
    assert moved["outer"]["state"][0]["momentum_buffer"].device.type == "meta"
    assert moved["outer"]["state"][0]["step"].device.type == "cpu" and moved["round"] == 3
