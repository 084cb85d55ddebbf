"""The time-to-target protocol's arithmetic (``bench/harness/time_to_target.py``), without
training: branch points, the checkpoint cadence, steps to target by interpolation between
branches, '<= S' and 'not reached'; the peers' pure parts (``bench/harness/peers.py``)."""
import pytest

from bench.harness import manifest, peers
from bench.harness import time_to_target as ttt
from bench.harness.catalogue import period


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
    """The streaming peer's fragments (``bench/harness/peers.py``): blocks strided over F, every
    parameter in exactly one fragment (the head is tied to the token embedding), the same
    parameters as thinwire's fragments."""
    from thinwire.models.gpt import GPT, GPTShape

    model = GPT(GPTShape(vocab_size=16, n_layer=4, n_embd=32, n_head=2, block_size=8))
    frags = peers.fragments_of(model, 2)
    ids = [[id(p) for p in f.parameters()] for f in frags]
    assert sorted(i for f in ids for i in f) == sorted(id(p) for p in model.parameters())
    assert [id(m) for m in frags[0] if m in model.blocks] == [id(model.blocks[0]), id(model.blocks[2])]
    assert [id(m) for m in frags[1] if m in model.blocks] == [id(model.blocks[1]), id(model.blocks[3])]
    # the same parameters as thinwire's streaming fragments (loose pieces dealt out in model order)
    from thinwire.comm.streaming import strided_fragments

    names = [n for n, _ in model.named_parameters()]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert [sorted(by_id[id(p)] for p in f.parameters()) for f in peers.fragments_of(model, 4)] == \
        [sorted(names[i] for i in idx) for idx in strided_fragments(names, 4)]
    assert peers.fragments_of(model, 1) == [model]
    with pytest.raises(SystemExit, match="--fragments=5"):
        peers.fragments_of(model, 5)


def test_torch_peer_rows_warm_up_fairly():
    """torch's PowerSGD docs: start_powerSGD_iter ~ 10% of the steps, no less than the LR
    warm-up (20); PostLocalSGD: torch's recipe, H-1 plain steps, so that its averages fall on
    the protocol's checkpoints (multiples of H)."""
    assert ttt.fair_warmup("torch PowerSGD r4", 160) == 20 and ttt.fair_warmup("torch PowerSGD r4", 960) == 96
    assert ttt.fair_warmup("torch PostLocalSGD H=8", 160) == 7 == ttt.fair_warmup("torch PostLocalSGD H=8", 960)
    assert ttt.peer_flags("torch PowerSGD r4", 320) == ["--peer=powersgd", "--rank-r=4", "--start-iter=32"]
    assert ttt.peer_flags("dense", 320) == []
    ttt.check_multiple(160, period("torch PostLocalSGD H=8"))


def test_powersgd_layout_follows_torchs_hook():
    """Where torch's powerSGD_hook keeps each tensor: the error vector in bucket order, Q for
    compressed tensors grouped by (n, m) shape in order of first appearance."""
    cp = peers
    # rank 2, min rate 2: (16, 8) and (8, 16) compress ((n + m) 2 x 2 < n m), vectors do not
    shapes = [(16, 8), (16,), (8, 16), (16, 8), (3,)]
    err, q, p_size, q_size = cp.powersgd_layout(shapes, 2, 2)
    assert err == [(0, 128), (128, 16), (144, 128), (272, 128), (400, 3)]
    assert q == {0: (0, 16), 3: (16, 16), 2: (32, 32)}  # the two (16, 8) first, then (8, 16)
    assert (p_size, q_size) == (16 * 2 * 2 + 8 * 2, 64)


def test_powersgd_state_moves_between_bucket_layouts_by_name():
    """A resumed process sees DDP's initial bucket layout, then the rebuilt one: the
    residual and warm-started Q follow the parameters, not the bucket's offsets."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    cp = peers
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in (("a", (16, 8)), ("b", (16,)), ("c", (8, 16)))}

    class Bucket:
        def __init__(self, names):
            self.names = names

        def index(self):
            return 0

        def is_last(self):
            return True

        def parameters(self):
            return [params[n] for n in self.names]

        def gradients(self):
            return [torch.zeros(params[n].shape) for n in self.names]

    def peer():
        st = PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
        p = cp.PowerSGDPeer(st, meter=None)
        p.param_names = {id(v): k for k, v in params.items()}
        return p

    saved = ("a", "b", "c")
    lay = tuple((n, tuple(params[n].shape)) for n in saved)
    err, q, p_size, _ = cp.powersgd_layout([s for _, s in lay], 2, 2)
    src = peer()
    src.inner.iter = 5
    src.layouts[0] = lay
    src.inner.error_dict[0] = torch.arange(err[-1][0] + err[-1][1], dtype=torch.float32)
    src.inner.q_memory_dict[0] = -torch.arange(sum(n for _, n in q.values()), dtype=torch.float32)
    state = src.state_dict()
    assert state["iter"] == 5 and set(state["error"]) == {"a", "b", "c"} and set(state["q"]) == {"a", "c"}

    dst = peer()
    dst.load_state_dict(state)
    dst.before_hook(Bucket(["c", "b", "a"]), first=True)  # the initial layout: another order
    e = dst.inner.error_dict[0]
    assert torch.equal(e, torch.cat([state["error"][n] for n in ("c", "b", "a")]))
    # Q by shape group in order of first appearance: (8, 16) of c first here, (16, 8) of a when saved
    assert torch.equal(dst.inner.q_memory_dict[0], torch.cat([state["q"]["c"], state["q"]["a"]]))
    assert dst.inner.p_memory_dict[0].numel() == p_size
    # torch's hook: a new residual, Q written in place
    dst.inner.error_dict[0] = e + 1000
    dst.inner.q_memory_dict[0] += 1000
    dst.before_hook(Bucket(list(saved)), first=True)  # DDP rebuilt its bucket: back to the saved order
    assert torch.equal(dst.inner.error_dict[0], torch.cat([state["error"][n] + 1000 for n in saved]))
    assert torch.equal(dst.inner.q_memory_dict[0], torch.cat([state["q"]["a"], state["q"]["c"]]) + 1000)
    assert torch.equal(dst.inner.error_dict[0][:128], state["error"]["a"] + 1000)
    again = dst.state_dict()
    assert all(torch.equal(again["error"][n], state["error"][n] + 1000) for n in saved)


def test_a_call_naming_some_rows_keeps_the_others_in_the_results_file(tmp_path, monkeypatch):
    """``S<S>_seed<seed>.json`` holds every row known for that S and seed: a call naming two rows
    keeps a third from the file when the file's target is the same dense run's, and drops it when
    the target differs (another dense run: its rows are not comparable). Training is replaced by
    fixed branch losses; other rows have no cached runs here."""
    import json

    measured = {"dense": {1: 2.0, 1.25: 1.95, 1.5: 1.9, 2: 1.85},
                "local H=8": {1: 2.1, 1.25: 2.02, 1.5: 1.99, 2: 1.93}}

    def fake_protocol(row, seed, a):
        return measured.get(row, {f: None for f in ttt.FS})

    monkeypatch.setattr(ttt, "OUT", str(tmp_path))
    monkeypatch.setattr(ttt, "protocol", fake_protocol)
    path = tmp_path / "S160_seed0.json"
    eager = {"1": 2.2, "1.25": 2.15, "1.5": 2.1, "2": 2.05}  # never reaches 2.0
    for target, kept in ((2.0, True), (2.5, False)):
        path.write_text(json.dumps({"target": target, "results": {"diloco H=8": eager}}))
        assert ttt.main(["--rows", "dense,local H=8", "--S", "160"]) == 0
        saved = json.loads(path.read_text())
        assert saved["target"] == 2.0
        assert list(saved["results"]) == (["dense", "local H=8", "diloco H=8"] if kept else ["dense", "local H=8"])
        # the results files carry their manifest: this call's command
        assert manifest.problems(str(tmp_path)) == []
        entry = json.loads((tmp_path / "MANIFEST.json").read_text())["S160_seed0.md"]
        assert entry["command"] == "python bench/time_to_target.py --rows 'dense,local H=8' --S 160"
        if kept:
            assert saved["results"]["diloco H=8"] == eager and saved["steps_to_target"]["diloco H=8"][0] is None
