"""The time-to-target protocol's arithmetic (``bench/time_to_target.py``), without training:
branch points, the checkpoint cadence, steps to target by interpolation between branches,
'<= S' and 'not reached'."""
import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "time_to_target.py"
_spec = importlib.util.spec_from_file_location("time_to_target", _path)
ttt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttt)


def test_branch_points_and_checkpoints():
    assert ttt.branch_points(960) == [(1, 768, 960), (1.25, 960, 1200), (1.5, 1152, 1440), (2, 1536, 1920)]
    assert ttt.constant_steps(960) == 1536  # the last branch starts where the constant run ends
    every = ttt.checkpoint_every(960)
    assert all(start % every == 0 for _, start, _ in ttt.branch_points(960)) and every == 192
    ttt.check_multiple(480, 8)
    with pytest.raises(ValueError, match="step 1250 is not a multiple of H=8"):
        ttt.check_multiple(1000, 8)
    with pytest.raises(ValueError, match="whole steps"):
        ttt.branch_points(999)


def test_steps_to_target_interpolates_between_the_branches():
    S, losses = 1000, {1: 2.0, 1.25: 1.9, 1.5: 1.8, 2: 1.7}
    # 1.85 lies halfway between the 1.25 S and 1.5 S branches: 1375 steps
    assert ttt.steps_to_target(S, losses, 1.85) == (pytest.approx(1375.0), "interpolated")
    # exactly a branch's loss: that branch's steps
    assert ttt.steps_to_target(S, losses, 1.8) == (pytest.approx(1500.0), "interpolated")
    # between 1.5 S and 2 S, a quarter of the way: 1.5 + 0.25 * 0.5 = 1.625 S
    assert ttt.steps_to_target(S, losses, 1.775)[0] == pytest.approx(1625.0)
    # a noisy, non-monotone curve: the first branch that reaches it, from the one before it
    assert ttt.steps_to_target(S, {1: 2.0, 1.25: 1.84, 1.5: 1.86, 2: 1.7}, 1.85)[0] == pytest.approx(
        1000 + 250 * (2.0 - 1.85) / (2.0 - 1.84))


def test_reached_at_S_and_not_reached():
    assert ttt.steps_to_target(960, {1: 1.79, 1.25: 1.7, 1.5: 1.6, 2: 1.5}, 1.8) == (960.0, "<= 1S")
    assert ttt.steps_to_target(960, {1: 1.8, 1.25: 1.7}, 1.8) == (960.0, "<= 1S")  # the target row itself
    assert ttt.steps_to_target(960, {1: 2.2, 1.25: 2.1, 1.5: 2.0, 2: 1.9}, 1.8) == (None, "not reached by 2S")
    # a branch not run (None) ends the search: nothing beyond it is claimed
    assert ttt.steps_to_target(960, {1: 2.2, 1.25: None, 1.5: 1.7, 2: 1.6}, 1.8) == (None, "not reached by 1S")
    assert ttt.show(None, "not reached by 2S", 960) == "not reached by 2S"
    assert ttt.show(1320.0, "interpolated", 960) == "1320 (1.375 S)"


def test_torchft_fragments_cover_every_parameter_once():
    """The streaming peer's fragments (``bench/torchft_peer.py``): blocks strided over F, every
    parameter in exactly one fragment (the head is tied to the token embedding)."""
    from thinwire.models.gpt import GPT, GPTShape

    spec = importlib.util.spec_from_file_location("torchft_peer", _path.parent / "torchft_peer.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)  # torchft itself is imported only inside the replicas
    model = GPT(GPTShape(vocab_size=16, n_layer=4, n_embd=32, n_head=2, block_size=8))
    frags = peer.fragments_of(model, 2)
    ids = [[id(p) for p in f.parameters()] for f in frags]
    assert sorted(i for f in ids for i in f) == sorted(id(p) for p in model.parameters())
    assert [id(m) for m in frags[0] if m in model.blocks] == [id(model.blocks[0]), id(model.blocks[2])]
    assert [id(m) for m in frags[1] if m in model.blocks] == [id(model.blocks[1]), id(model.blocks[3])]
    assert peer.fragments_of(model, 1) == [model]
    with pytest.raises(SystemExit, match="--fragments=5"):
        peer.fragments_of(model, 5)
