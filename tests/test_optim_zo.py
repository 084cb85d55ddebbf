"""Zeroth-order plugins: MeZO against finite differences, its memory and restore
properties, gradient accumulation, zo_dist on 2 and 3 gloo ranks against a
single-process simulation of p workers, wire bytes, the entry-point registry, resume.

Helpers (tiny models, batches, configs) live here and are imported by test_lora.py."""
from __future__ import annotations

import json
import os
import textwrap
import zlib
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli, run_ranks
from thinwire.optim.mezo import MeZOPlugin, add_noise, perturbation_cycle, zo_seed
from thinwire.optim.plugins import OPTIMIZERS
from thinwire.config.groups import groups

VOCAB = 40


def tiny_gpt(seed: int = 0, vocab: int = VOCAB, n_embd: int = 16):
    from thinwire.models.gpt import build_gpt

    torch.manual_seed(seed)
    return build_gpt(info=SimpleNamespace(vocab_size=vocab), n_layer=2, n_head=2, n_embd=n_embd, block_size=16)


def token_batch(key: tuple, size: int = 4, vocab: int = VOCAB, length: int = 16) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    w = torch.randint(0, vocab, (size, length + 1), generator=g)
    return {"x": w[:, :-1], "y": w[:, 1:]}


class FakeData:
    """``train_batch(step)`` of one rank, the only data API the plugins use."""

    def __init__(self, rank: int = 0, size: int = 4):
        self.rank, self.size = rank, size

    def train_batch(self, step: int) -> dict:
        return token_batch(("train", self.rank, step), self.size)


def optim_cfg(**kw):
    """``optim=<name>``'s typed config with ``kw`` set (name defaults to mezo)."""
    return OmegaConf.merge(OmegaConf.structured(groups()["optim"].schema(kw.get("name", "mezo"))), kw)


def peft_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(groups()["peft"].schema(kw.get("name", "lora"))), kw)


def world(rank: int, world_size: int):
    return SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"))


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---- MeZO ----------------------------------------------------------------------------
class Quadratic(torch.nn.Module):
    def __init__(self, n: int = 50):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("a", m @ m.T / n)
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.theta @ self.a @ self.theta + self.b @ self.theta + 0 * x.sum()


def test_projected_gradient_is_the_directional_derivative_on_a_quadratic():
    model = Quadratic()
    params = [model.theta]
    seed = zo_seed(0, 3, 0)
    z = torch.zeros_like(model.theta)
    add_noise([z], seed, 1.0, chunk=7)               # z(seed), drawn in the same chunks
    grad = (model.a @ model.theta + model.b).detach()
    before = model.theta.detach().clone()
    lp, lm = perturbation_cycle(model, params, seed, 1e-3, 7, [{"x": torch.zeros(1)}])
    g = float((lp - lm) / 2e-3)
    assert g == pytest.approx(float(grad @ z), rel=1e-6)  # central differences are exact on quadratics
    torch.testing.assert_close(model.theta.detach(), before, rtol=0, atol=1e-12)


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op allocates (numel): outputs that share storage with
    an input (views, in-place ops) are not allocations."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_mezo_step_keeps_no_parameter_sized_tensor_and_restores_at_lr0():
    model = tiny_gpt(vocab=512, n_embd=32)         # the embedding (16384) is the largest tensor
    batch = token_batch(("mem",), size=2, length=8, vocab=512)
    cfg = optim_cfg(name="mezo", lr=0.0, schedule="constant", zo_chunk=1024, zo_eps=1e-3)
    plugin = MeZOPlugin(cfg, model, max_steps=10)
    emb = model.tok_emb.weight.numel()
    with torch.no_grad(), LargestAllocation() as inference:
        model.eval()
        model(**batch)
    before = flat_params(model)
    with LargestAllocation() as step:
        plugin.compute(model, batch)
        assert plugin.local_finite()
        plugin.apply(0)
    assert step.largest <= max(inference.largest, cfg.zo_chunk) < emb
    after = flat_params(model)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)  # +eps z -2eps z +eps z, then lr = 0
    assert not torch.equal(after, before)  # float rounding: not bitwise reversible (why tests use a tolerance)
    assert plugin.state_dict() == {"t": 1}


def test_mezo_uses_its_own_generator_and_eval_mode():
    model = tiny_gpt()
    model.train()
    plugin = MeZOPlugin(optim_cfg(name="mezo", lr=1e-3), model, max_steps=10)
    state = torch.get_rng_state()
    plugin.compute(model, token_batch(("rng",)))
    plugin.apply(0)
    assert torch.equal(torch.get_rng_state(), state) and model.training


def test_gradient_accumulation_equals_one_big_batch():
    batch = token_batch(("accum",), size=8)
    out = []
    for accum in (1, 4):
        model = tiny_gpt().double()  # float64: the loss differences are not lost to float32 rounding
        plugin = MeZOPlugin(optim_cfg(name="mezo", lr=1e-2, zo_accum=accum, zo_samples=2), model, max_steps=10)
        plugin.compute(model, batch)
        g = plugin.grads.clone()
        plugin.apply(0)
        out.append((g, flat_params(model)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-9, atol=1e-12)
    assert not torch.equal(out[0][1], flat_params(tiny_gpt().double()))


# ---- zo_dist -------------------------------------------------------------------------
STEPS = 3
DIST = dict(name="zo_dist", lr=3e-2, schedule="constant", zo_eps=1e-2, zo_qstep=2.0 ** -6)


def _zo_rank(rank, world_size, mode):
    from thinwire.comm.accounting import WireMeter
    from thinwire.optim.zo_dist import ZODistPlugin

    model = tiny_gpt()
    meter = WireMeter()
    plugin = ZODistPlugin(optim_cfg(**DIST, zo_mode=mode), model, max_steps=10,
                          world=world(rank, world_size), meter=meter)
    sent, losses, agreed = [], [], []
    for t in range(STEPS):
        losses.append(float(plugin.compute(model, token_batch(("zo", rank, t)))))
        agreed.append(plugin.agreement())
        assert plugin.local_finite()
        plugin.apply(t)
        sent.append(meter.take_step())
    return {"params": flat_params(model), "sent": sent, "state": plugin.state_dict(), "losses": losses,
            "agreed": agreed}


def _reference(p, mode):
    """p workers simulated in one process: the algorithm written out from the primitives."""
    model = tiny_gpt()
    params = list(model.parameters())
    eps, lr, delta, chunk = DIST["zo_eps"], DIST["lr"], DIST["zo_qstep"], 65536
    model.eval()
    with torch.no_grad():
        for t in range(STEPS):
            batches = [[token_batch(("zo", i, t))] for i in range(p)]
            if mode == "shared":
                s = zo_seed(0, t, 0, 0)
                add_noise(params, s, eps, chunk)
                lp = [model(**b[0]) for b in batches]
                add_noise(params, s, -2 * eps, chunk)
                lm = [model(**b[0]) for b in batches]
                add_noise(params, s, eps, chunk)
                g = sum(float((a - b) / (2 * eps)) for a, b in zip(lp, lm)) / p
                add_noise(params, s, -lr * g, chunk)
                continue
            gs = []
            for i in range(p):
                lp, lm = perturbation_cycle(model, params, zo_seed(0, t, 0, i), eps, chunk, batches[i])
                gs.append(float((lp - lm) / (2 * eps)))
            q = [max(-127, min(127, round(g / delta))) for g in gs]
            for i in range(p):
                if q[i]:
                    add_noise(params, zo_seed(0, t, 0, i), -lr * (q[i] * delta) / p, chunk)
            m = max(abs(v) for v in q)
            delta = delta * 2 if m >= 127 else delta / 2 if m < 32 else delta
    return flat_params(model), delta


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("mode", ["shared", "per_rank"])
def test_zo_dist_equals_single_process_simulation(tmp_path, p, mode):
    torch.set_num_threads(1)  # the ranks run one thread each: same kernels, same floats
    results = run_ranks(_zo_rank, p, tmp_path, mode)
    for r in results[1:]:
        assert torch.equal(r["params"], results[0]["params"])  # ranks bitwise identical
        assert r["state"] == results[0]["state"]
    ref, delta = _reference(p, mode)
    torch.testing.assert_close(results[0]["params"], ref, rtol=0, atol=1e-6)
    assert not torch.equal(ref, flat_params(tiny_gpt()))  # the parameters did move
    if mode == "per_rank":
        assert results[0]["state"]["qstep"] == delta
    # everything a step sends, the loss for logging and the non-finite flag included
    expected = 3 * (p - 1) if mode == "per_rank" else round(2 * (p - 1) / p * 4) + round(2 * (p - 1) / p * 2)
    for r in results:
        for sent in r["sent"]:
            assert sent == {"data": expected} and expected <= 8
    for t in range(STEPS):  # the agreed loss is the mean of the ranks' losses (sent as fp16)
        mean = sum(r["losses"][t] for r in results) / p
        for r in results:
            assert r["agreed"][t][1] is True
            assert r["agreed"][t][0] == pytest.approx(mean, rel=2e-3)


def test_zo_dist_on_one_rank_equals_the_simulation():
    """One rank (a single-GPU user): its message's fp16 loss sits at an odd byte offset of
    a contiguous row, which a ``.contiguous()`` view could not reinterpret."""
    torch.set_num_threads(1)
    result = _zo_rank(0, 1, "per_rank")
    ref, delta = _reference(1, "per_rank")
    torch.testing.assert_close(result["params"], ref, rtol=0, atol=1e-6)
    assert result["state"]["qstep"] == delta


def test_zo_quantisation_scale_rule():
    from thinwire.optim.zo_dist import dequantise, next_delta, quantise

    q = quantise(torch.tensor([0.5, -100.0, float("nan")]), 0.25)
    assert q.tolist() == [2, -127, -128]
    assert dequantise(q[:2], 0.25).tolist() == [0.5, -31.75]
    assert next_delta(q, 0.25) == 0.5                    # saturated: grow
    assert next_delta(torch.tensor([3, -5], dtype=torch.int8), 0.25) == 0.125  # < 5 bits: shrink
    assert next_delta(torch.tensor([64], dtype=torch.int8), 0.25) == 0.25


# ---- registry ------------------------------------------------------------------------
def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match=r"optim='nope'.*mezo.*zo_dist"):
        OPTIMIZERS.get("nope", "optim")


@pytest.mark.extended  # a CLI launch: ~13 s; entry points stay covered by tests/test_plugins.py
@pytest.mark.slow
def test_entry_point_plugin_is_found_and_trains(tmp_path):
    """A third-party package registers ``halfsgd`` in the ``thinwire.optim`` group."""
    pkg = tmp_path / "site"
    (pkg / "halfsgd_pkg-0.1.dist-info").mkdir(parents=True)
    (pkg / "halfsgd_pkg-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: halfsgd-pkg\n"
                                                               "Version: 0.1\n")
    (pkg / "halfsgd_pkg-0.1.dist-info" / "entry_points.txt").write_text(
        "[thinwire.optim]\nhalfsgd = halfsgd_pkg:HalfSGD\n")
    (pkg / "halfsgd_pkg.py").write_text(textwrap.dedent("""
        import torch
        from thinwire.optim.plugins import BackpropPlugin

        class HalfSGD(BackpropPlugin):
            def make_optimizer(self, groups):
                print("halfsgd: built", flush=True)
                return torch.optim.SGD(groups, lr=self.cfg.lr / 2)
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
    p = run_cli("experiment=tiny", "optim=halfsgd", "trainer.max_steps=2", "dist.nproc=1",
                f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "halfsgd: built" in p.stdout


# ---- resume --------------------------------------------------------------------------
RESUME = ["experiment=tiny", "model.n_embd=32", "trainer.max_steps=8", "trainer.checkpoint_every=4",
          "trainer.eval_every=4", "model.dropout=0.1", "optim.lr=1e-3"]


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return list(map(json.loads, fh))


def _final(run_dir, step=8):
    ck = run_dir / "checkpoints" / f"step_{step:08d}"
    common = torch.load(ck / "common.pt", weights_only=False)
    return common["model"], common["optim"]


@pytest.mark.parametrize("nproc,extra", [
    # MeZO on the adapters of a LoRA-GA model (PEFT-only ZO), 2 ranks: the plugin's counter,
    # the modified base weights, and LoRA-GA's estimate collectives replayed on resume
    (2, ["optim=mezo", "optim.zo_accum=2", "optim.zo_samples=2", "peft=lora_ga", "peft.r=4", "peft.ga_batches=2"]),
    (2, ["optim=zo_dist"]),                   # per_rank: the counter and the int8 scale
], ids=["mezo-lora_ga-ws2", "zo_dist-ws2"])
def test_zo_resume_is_bitwise(pools, tmp_path, nproc, extra):
    """Resumed == uninterrupted, bitwise: per-step losses, evals, projected gradients,
    plugin state and every tensor of the model (adapters and base weights). Two runs
    instead of three (each worker imports PEFT, seconds of a 2-core CI): the full run's
    step-4 checkpoint is resumed in a second run directory, whose steps 5-8 must equal
    the full run's (``trainer.stop_after`` + ``resume=auto`` use the same load path and
    are covered by test_resume.py)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*RESUME, f"dist.nproc={nproc}", *extra]
    p = pools.train(*args, f"hydra.run.dir={full}")
    p = pools.train(*args, f"hydra.run.dir={resumed}", f"trainer.resume={full / 'checkpoints' / 'step_00000004'}")
    assert "at step 4" in p.stdout
    key = lambda r: (r["step"], r["loss"], r.get("val_loss"), r.get("zo_grad"))  # noqa: E731
    tail = [key(r) for r in _metrics(full) if r["step"] > 4]
    assert len(tail) == 4 and tail == [key(r) for r in _metrics(resumed)]
    (ma, oa), (mb, ob) = _final(full), _final(resumed)
    assert oa == ob and oa["t"] == 8
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    if "peft=lora_ga" in extra:
        assert any("lora_A" in k for k in ma) and any(k.endswith("base_layer.weight") for k in ma)
    # p = 2: zo_dist all-gathers int8 q + fp16 loss (1 + 2); mezo all-reduces 2 fp32 g + fp16 loss (8 + 2)
    plugin_bytes = 3 if "optim=zo_dist" in extra else 10
    for r in _metrics(full):  # the trainer's own control packet is counted apart
        if "val_loss" not in r:  # eval steps add the evaluation's all-reduce to wire_bytes
            assert r["wire_bytes"] - r["control_bytes"] == plugin_bytes


def test_zo_dist_sends_at_most_8_bytes_per_rank_per_step_control_included(pools, tmp_path):
    """Through the real trainer: the loss and the non-finite flag ride on the plugin's own
    exchange, so nothing else crosses the wire on a training step (evals aside)."""
    import json

    from conftest import run_cli

    for mode in ("per_rank", "shared"):
        run = tmp_path / mode
        p = pools.train("experiment=tiny", "optim=zo_dist", f"optim.zo_mode={mode}", "trainer.max_steps=6",
                        "trainer.eval_every=6", f"hydra.run.dir={run}")
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        train_rows = [r for r in rows if "val_loss" not in r]
        assert train_rows and all(0 < r["wire_bytes"] <= 8 and r["control_bytes"] == 0 for r in train_rows), rows


@pytest.mark.parametrize("mode", ["per_rank", "shared"])
def test_nan_on_one_rank_under_zo_dist_skips_the_step_everywhere(pools, tmp_path, mode):
    """``trainer.faults.nan_at`` poisons a zeroth-order rank's losses (there is no backward to
    hook): the step's estimate is non-finite, every rank skips it, the parameters stay."""
    import json

    p = pools.train("experiment=tiny", "optim=zo_dist", f"optim.zo_mode={mode}", "trainer.max_steps=5",
                    "trainer.eval_every=100", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0",
                    "trainer.faults.nan_at=3", "trainer.faults.rank=1", f"hydra.run.dir={tmp_path}")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1], rows
    # no update was applied at step 3 (apply() logs the estimate; a skipped step does not). The
    # parameters themselves match only up to rounding: the in-place perturb-and-restore of the
    # estimate is not bitwise exact, skipped or not
    assert ["zo_grad" in r for r in rows] == [True, True, False, True, True], rows
