"""``sync.anchor_device=cpu``: the outer loop's anchor and outer-optimizer state kept in host
memory (pinned under CUDA), the outer step computed on the model's device.

- every outer strategy (local with Nesterov, Adam outer, streaming fragments with a merge
  weight, co2 stale and eager) in one process: the anchor and the per-element outer state
  are separate tensors on the CPU, ``anchor_device_bytes`` is their hand-counted size, and
  parameters and metrics are bitwise those of the default placement, also after a resume;
- the same through the trainer at 2 ranks under ``engine=ddp`` and ``engine=fsdp2``
  (extended tier), and on a GPU a CUDA model against CPU anchors (skipped without CUDA);
- a bad value is one ConfigError line naming ``sync.anchor_device``.

On a CPU-only machine the model's device is the CPU too: there the option still keeps its
own copies and stages them in and out of every outer step (the code path a GPU takes, with
the copies on the same device), so the bitwise checks cover the staging, not a no-op.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from pool import POOLS
from thinwire import OuterLoop
from thinwire.errors import ConfigError

NESTEROV = {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True}
CASES = {
    "local": ("local", {"local_steps": 2, "outer_optim": NESTEROV}),
    "adam_outer": ("local", {"local_steps": 2, "outer_optim": {"_target_": "torch.optim.Adam", "lr": 0.05}}),
    "streaming": ("local", {"local_steps": 2, "fragments": 2, "fragment_alpha": 0.5, "outer_optim": NESTEROV}),
    "co2": ("co2", {"local_steps": 2}),
    "eager": ("co2", {"local_steps": 2, "overlap": "eager"}),
}
TIMING = ("comm_wait_s", "overlap_fraction")  # wall-clock metrics


def _run(sync, options, device="cpu", steps=7, anchor_device=None, resume=None):
    """A 2-layer model under OuterLoop for ``steps`` steps (stopped and resumed at 4 when
    ``resume``); returns the model, the loop and every step's metrics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    outer = OuterLoop(model, sync, anchor_device=anchor_device, **options)
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        x, y = torch.randn(5, 4, generator=g).to(device), torch.randint(0, 3, (5,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(outer.step())
        if resume and step == 3:
            state = outer.state_dict()
            outer = OuterLoop(model, sync, anchor_device=anchor_device, **options)
            outer.load_state_dict(state)
    outer.close()
    return model, outer, out


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING and k != "anchor_device_bytes"} for r in rows]


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in ("local", "co2") else pytest.mark.extended)
                                  for c in CASES])
def test_anchor_on_cpu_is_where_it_says_and_bitwise(case):
    sync, options = CASES[case]
    ref_model, _, ref = _run(sync, options)
    for resume in (False, True):
        model, outer, rows = _run(sync, options, anchor_device="cpu", resume=resume)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters())), (case, resume)
        assert _untimed(rows) == _untimed(ref), (case, resume)
        st = outer.strategy
        params = [p for p in model.parameters()]
        numel = sum(p.numel() for p in params)
        assert all(a.device == torch.device("cpu") for a in st.anchor)
        assert not {a.untyped_storage().data_ptr() for a in st.anchor} & {p.untyped_storage().data_ptr()
                                                                          for p in params}
        state = [v for s in st.outer.optimizer.state.values() for k, v in s.items() if k != "step"]
        per_element = {"local": 1, "adam_outer": 2, "streaming": 1, "co2": 1, "eager": 0}[case]  # momentum, Adam's 2
        assert len(state) == per_element * len(params) and all(v.device == torch.device("cpu") for v in state)
        extra = {"co2": numel, "eager": numel}.get(case, 0)  # co2: the last anchor move; eager: the start s_i
        want = 4 * (numel + per_element * numel + extra)
        assert st.anchor_device_bytes() == want, (case, st.anchor_device_bytes(), want)
        assert [r for r in rows if "outer_round" in r][-1]["anchor_device_bytes"] == want


def test_bad_anchor_device_is_one_line():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"^sync\.anchor_device=cuda: expected cpu or null"):
        OuterLoop(model, "local", anchor_device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a model on the GPU, anchors in pinned host memory")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_model_with_cpu_anchor_is_bitwise(case):
    sync, options = CASES[case]
    ref_model, _, ref = _run(sync, options, device="cuda")
    model, outer, rows = _run(sync, options, device="cuda", anchor_device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters())), case
    assert _untimed(rows) == _untimed(ref), case
    assert all(a.device.type == "cpu" and a.is_pinned() for a in outer.strategy.anchor)


BASE = ["experiment=tiny", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
        "data.eval_batches=4", "dist.nproc=2", "optim.grad_clip=0", "sync=co2", "sync.local_steps=2", "comm=int8"]


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.extended
@pytest.mark.parametrize("engine", [["engine=ddp"], ["engine=fsdp2", "engine.shard_group_size=1"]])
def test_trainer_with_cpu_anchor_is_bitwise(engine, tmp_path):
    """2 ranks, sync=co2 (stale: momentum and the last anchor move at home), int8 average,
    stopped after step 3 and resumed: every metric bitwise the default placement's but
    ``residual_norm``, which under co2 counts a round's residuals when gloo's thread finishes it
    (tests/test_fsdp2.py::test_shard_size_one_equals_ddp excludes it under co2 too)."""
    POOLS.train(*BASE, *engine, f"hydra.run.dir={tmp_path}/ref")
    run = [*BASE, *engine, "sync.anchor_device=cpu", f"hydra.run.dir={tmp_path}/cpu"]
    first = POOLS.train(*run, "trainer.stop_after=3")
    assert "sync.anchor_device=cpu" in first.stdout
    POOLS.train(*run, "trainer.resume=auto")
    ref, cpu = _metrics(tmp_path / "ref"), _metrics(tmp_path / "cpu")
    keys = {k for r in ref for k in r if not k.endswith("_s")} - set(TIMING) - {"residual_norm"}  # no timings
    assert [r["step"] for r in cpu] == list(range(1, 7))
    for key in sorted(keys):
        assert [r.get(key) for r in cpu] == [r.get(key) for r in ref], key
    anchor = torch.load(tmp_path / "cpu" / "checkpoints" / "step_00000006" / "rank00000.pt",
                        weights_only=True)["sync"]["anchor"]
    numel = sum(a.numel() for a in anchor)  # S = 1: the whole model
    # step 6 ends round 3: anchor + outer momentum + the last anchor move, fp32
    assert cpu[-1]["anchor_device_bytes"] == 3 * 4 * numel, (cpu[-1]["anchor_device_bytes"], numel)
    assert "anchor_device_bytes" not in ref[-1]
