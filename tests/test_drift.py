"""The replica-drift guard: silent while ranks agree, one line naming step, tensor and rank
when one rank's consensus state moves by a single ulp."""
import pytest
import torch

from conftest import run_ranks
from thinwire.trainer.drift import check_period, combined_digest, tensor_digest

TINY = ["experiment=tiny", "trainer.max_steps=6", "trainer.eval_every=100", "trainer.checkpoint_every=100",
        "trainer.drift_check_every=1", "dist.nproc=2"]
# each mode: 2 rounds checked silently (steps 2 and 4), then rank 1 drifts at step 6
MODES = {
    "ddp": ["sync=ddp"],
    "ddp+topk+ef": ["sync=ddp", "comm=topk", "comm.ratio=0.05", "comm.feedback=ef", "comm.min_numel=256"],
    "demo": ["optim=demo"],
    # the parameters, then the plugin's moments; rank 1 drifts in the first parameter
    "adam1bit": ["optim=adam1bit", "optim.freeze_step=3"],
    "local": ["sync=local", "sync.local_steps=2"],
    "co2": ["sync=co2", "sync.local_steps=2"],
    "eager": ["sync=co2", "sync.overlap=eager", "sync.local_steps=2"],  # the consensus anchor
    # each fragment's global copy; rounds of 2 steps, fragment 0 synchronised mid-round
    "streaming": ["sync=local", "sync.local_steps=2", "sync.fragments=2", "sync.fragment_delay=0"],
}
FIRST_TENSOR = {"ddp": "tok_emb.weight", "adam1bit": "tok_emb.weight", "ddp+topk+ef": "tok_emb.weight", "demo": "tok_emb.weight",
                "local": "anchor.tok_emb.weight", "co2": "anchor.tok_emb.weight", "eager": "anchor.tok_emb.weight",
                "streaming": "anchor.tok_emb.weight"}


def test_digest_sees_one_ulp_dtype_and_shape():
    x = torch.randn(100)
    y = x.clone()
    y[37] = torch.nextafter(y[37], torch.tensor(float("inf")))
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x) != tensor_digest(x.view(10, 10))
    assert tensor_digest(torch.zeros(4)) != tensor_digest(torch.zeros(2, dtype=torch.float64))
    assert tensor_digest(x.bfloat16()) != tensor_digest(x.half())
    assert combined_digest([1, 2]) != combined_digest([2, 1])


def test_period_is_a_whole_number_of_rounds():
    assert check_period(None, 1) == 100 and check_period(None, 8) == 8
    assert check_period(1, 8) == 8 and check_period(9, 8) == 16 and check_period(0, 8) == 0
    assert check_period(5, 1) == 5


def train_catching_drift(rank, world_size, yaml):
    """``train`` on the pool's ranks; the drift error's text, or None if the run finished."""
    from thinwire.config import from_yaml
    from thinwire.trainer.drift import ReplicaDriftError
    from thinwire.trainer.loop import train
    from thinwire.trainer.world import init_world

    world = init_world("gloo", timeout_s=120.0, threads=1)
    try:
        train(from_yaml(yaml), world)
    except ReplicaDriftError as e:
        return str(e)
    return None


def run(tmp_path, *overrides):
    from thinwire.config import compose, to_yaml, validate

    cfg = compose([*overrides, f"hydra.run.dir={tmp_path}"])
    validate(cfg)
    return run_ranks(train_catching_drift, 2, tmp_path, to_yaml(cfg))


@pytest.mark.parametrize("mode", list(MODES))
def test_one_ulp_on_one_rank_is_caught_after_silent_rounds(tmp_path, mode):
    errors = run(tmp_path / "drift", *TINY, *MODES[mode], "trainer.faults.drift_at=6", "trainer.faults.rank=1")
    assert errors[0] == errors[1] and errors[0] is not None, errors  # both ranks stop, with the same line
    assert errors[0].startswith(f"replica drift after step 6: {FIRST_TENSOR[mode]} on rank 1 differs from rank 0")
    assert "\n" not in errors[0]


def test_silent_without_a_fault_and_counted_as_control_bytes(tmp_path):
    base = ["experiment=tiny", "trainer.max_steps=4", "trainer.eval_every=100", "trainer.checkpoint_every=100",
            "dist.nproc=2", "sync=local", "sync.local_steps=2", "logger=none"]
    off = run(tmp_path / "off", *base, "trainer.drift_check_every=0")
    on = run(tmp_path / "on", *base, "trainer.drift_check_every=1")
    assert off == [None, None] and on == [None, None]
    import json
    rows = {k: [json.loads(x) for x in open(tmp_path / k / "metrics.jsonl")] for k in ("off", "on")}
    for a, b in zip(rows["off"], rows["on"]):
        assert a["loss"] == b["loss"]  # the guard only reads
        # per check, an 8-byte hash and an 8-byte skip count all-gathered at p = 2: 16 bytes sent
        assert b["control_bytes"] - a["control_bytes"] == (16 if a["step"] % 2 == 0 else 0), (a, b)
        if b["step"] % 2 == 0:  # local: every rank's count of skipped steps, at every check
            assert b["skipped_steps/rank0"] == b["skipped_steps/rank1"] == 0, b


def test_a_diverging_strategy_that_declares_nothing_turns_the_guard_off_with_one_line(capsys):
    from types import SimpleNamespace

    from thinwire.comm.sync import SyncStrategy
    from thinwire.trainer.drift import DriftGuard

    class Wander(SyncStrategy):  # ranks diverge and nothing is declared: nothing can be checked
        ranks_diverge = True

    world = SimpleNamespace(rank=0, world_size=2, is_main=True, device=torch.device("cpu"))
    sync = Wander(SimpleNamespace(name="wander"), world, None, torch.nn.Linear(2, 2))
    guard = DriftGuard(None, sync, None, world, None)
    assert guard.period == 0 and not guard.due(100)
    assert capsys.readouterr().out == "thinwire: drift guard off for sync=wander: it declares no consensus state\n"
