"""docs/extending.md's worked examples (the files of docs/examples/: the compressor ``qsgd``,
the sync strategy ``easgd`` and the optimizer plugin ``lion``), installed as a distribution
with entry points (a dist-info directory built from docs/examples/pyproject.toml, on
PYTHONPATH) and checked in fresh interpreters (entry points are read once per process):
the doc holds exactly the files; every option works from the command line and a bad value
exits 2 with one line; the math against hand-computed references; one short training run
with all three together."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import run_fresh_ranks

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")
PACKAGE = "thinwire_examples"
DOC = os.path.join(REPO, "docs", "extending.md")


def example_modules() -> dict[str, str]:
    """``thinwire_examples/<name>.py`` -> its text, every module but ``__init__``."""
    pkg = os.path.join(EXAMPLES, PACKAGE)
    return {f"{PACKAGE}/{f}": open(os.path.join(pkg, f)).read()
            for f in sorted(os.listdir(pkg)) if f.endswith(".py") and f != "__init__.py"}


def entry_point_groups() -> dict[str, dict[str, str]]:
    with open(os.path.join(EXAMPLES, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["entry-points"]


def copy_package(root) -> None:
    shutil.copytree(os.path.join(EXAMPLES, PACKAGE), root / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example package and its entry points, as an installed distribution."""
    root = tmp_path_factory.mktemp("site")
    info = root / "thinwire_examples-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thinwire-examples\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in entry_point_groups().items()))
    copy_package(root)
    return root


def run_py(site, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def run_train(site, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "thinwire.train", *overrides], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=180)


def ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# ---- the doc cannot drift from the files ---------------------------------------------
def test_doc_holds_exactly_the_example_files():
    doc = open(DOC).read()
    blocks = re.findall(r"```(\w+)\n(.*?)```", doc, flags=re.S)
    python = {m.group(1): code for lang, code in blocks if lang == "python"
              for m in [re.match(r"# (\S+\.py)\n", code)] if m}
    assert python == example_modules()
    assert len(python) == 3
    # the entry-point tables shown are the package's, all of them
    toml = [code for lang, code in blocks if lang == "toml"]
    shown = {}
    for code in toml:
        for group, eps in tomllib.loads(code)["project"]["entry-points"].items():
            shown.setdefault(group, {}).update(eps)
    assert shown == entry_point_groups()
    assert set(shown) == {"thinwire.compressors", "thinwire.sync", "thinwire.optim"}
    init = open(os.path.join(EXAMPLES, PACKAGE, "__init__.py")).read()
    assert re.fullmatch(r'"""[^"]*"""\n', init), "__init__.py holds only a docstring (the doc says so)"


# ---- the options from the command line ----------------------------------------------
def test_options_from_the_command_line(site):
    ok(run_py(site, """
        from thinwire.config import ConfigError, compose, validate

        cfg = compose(["experiment=tiny", "comm=qsgd", "comm.levels=8", "sync=easgd", "sync.period=2",
                       "sync.beta=0.5", "optim=lion", "optim.lr=3e-4", "optim.betas=[0.9,0.98]"])
        validate(cfg)
        assert (cfg.comm.name, cfg.comm.levels, cfg.comm.block_size) == ("qsgd", 8, 512), cfg.comm
        assert (cfg.sync.name, cfg.sync.period, cfg.sync.beta) == ("easgd", 2, 0.5), cfg.sync
        assert (cfg.optim.name, list(cfg.optim.betas), cfg.optim.grad_clip) == ("lion", [0.9, 0.98], 1.0)

        # the defaults are the classes' own
        d = compose(["comm=qsgd", "sync=easgd", "optim=lion"])
        validate(d)
        assert (d.comm.levels, d.sync.period, d.sync.beta, list(d.optim.betas)) == (4, 4, 0.9, [0.9, 0.99])

        # an option's keys are its own: another option rejects them, ++ sets them only where they exist
        try:
            compose(["comm=int8", "comm.levels=8"])
            raise AssertionError("comm.levels accepted by comm=int8")
        except ConfigError as e:
            assert str(e).startswith("comm.levels: not an option of comm=int8"), e
        assert "levels" not in compose(["comm=int8", "++comm.levels=8"]).comm
        assert compose(["comm=qsgd", "++comm.levels=8"]).comm.levels == 8
        print("ok")
    """))


@pytest.mark.extended  # a fresh interpreter per case: ~3 s each
@pytest.mark.slow
@pytest.mark.parametrize("overrides, line", [
    (["comm=qsgd", "comm.levels=200"], "comm.levels=200: must be an int in [1, 127]"),
    (["sync=easgd", "sync.period=0"], "sync.period=0: must be >= 1"),
    (["optim=lion", "optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
])
def test_bad_value_exits_2_with_one_line(site, tmp_path, overrides, line):
    p = run_train(site, "experiment=tiny", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], p.stderr
    assert not (tmp_path / "run").exists()  # nothing started


# ---- the math -------------------------------------------------------------------------
def test_qsgd_against_its_definition(site):
    ok(run_py(site, """
        import math
        import torch
        from thinwire.comm import build_compressor

        # values on a level of their bucket (s |v_i| / ||v|| an integer) are sent exactly
        c = build_compressor("qsgd", levels=5, block_size=8)
        v = torch.tensor([3.0, -4.0, 0, 0, 0, 0, 0, 0, 0.75, -1.0])   # bucket norms 5 and 1.25
        p = c.compress(v, step=7)
        assert p.nbytes == 10 * 1 + 2 * 4, p.nbytes                  # int8 codes, one fp32 norm per bucket
        assert p.tensors["codes"].tolist() == [3, -4, 0, 0, 0, 0, 0, 0, 3, -4]
        assert torch.equal(c.decompress(p), v)

        # random values: Q_s(v)_i = ||v|| sign(v_i) xi_i / s, xi_i in {l, l + 1}, P(l + 1) = r - l
        s, bs, n, K = 4, 64, 300, 4000
        x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        c = build_compressor("qsgd", levels=s, block_size=bs, seed=3)
        outs = torch.stack([c.decompress(c.compress(x.float(), step=k)).double() for k in range(K)])
        norms = torch.cat([b.norm().repeat(b.numel()) for b in x.split(bs)])
        unit = norms / s                                               # the spacing of the levels
        r = x.abs() / unit
        lo, frac = r.floor(), r - r.floor()
        xi = outs.abs() / unit
        assert torch.all((outs == 0) | (outs.sign() == x.sign()))
        assert torch.all(((xi - lo).abs() < 1e-4) | ((xi - lo - 1).abs() < 1e-4))
        assert torch.equal(c.decompress(c.compress(x.float(), step=5)), c.decompress(c.compress(x.float(), step=5)))
        assert not torch.equal(outs[0], outs[1])
        other = build_compressor("qsgd", levels=s, block_size=bs, seed=4)
        assert not torch.equal(other.decompress(other.compress(x.float(), step=0)).double(), outs[0])
        # unbiased, with the variance of a two-point draw: unit^2 (r - l)(1 - (r - l))
        var = unit ** 2 * frac * (1 - frac)
        z = (outs.mean(0) - x).abs() / (var / K).sqrt().clamp_min(1e-12)
        assert z.max() < 5.5, z.max()
        emp = outs.var(0)
        assert abs(float(emp.sum() / var.sum()) - 1) < 0.05, (emp.sum(), var.sum())
        # within the paper's bound (Lemma 3.1): E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2, per bucket
        for b, eb in zip(x.split(bs), emp.split(bs)):
            d = b.numel()
            assert eb.sum() <= 1.1 * min(d / s ** 2, math.sqrt(d) / s) * b.norm() ** 2
        print("ok")
    """))


def test_lion_against_hand_computed_updates(site):
    ok(run_py(site, """
        import copy
        import torch
        from thinwire.config import compose, validate
        from thinwire.optim.plugins import OPTIMIZERS

        lr, wd, b1, b2 = 0.1, 0.5, 0.8, 0.9
        cfg = compose(["experiment=tiny", "optim=lion", f"optim.lr={lr}", "optim.schedule=constant",
                       "optim.warmup_steps=0", "optim.grad_clip=0", f"optim.weight_decay={wd}",
                       f"optim.betas=[{b1},{b2}]"])
        validate(cfg)

        class Net(torch.nn.Module):   # loss = sum(w * a) + sum(c * b^2): dL/dw = a, dL/db = 2 c b
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
                self.b = torch.nn.Parameter(torch.tensor([0.4, -0.3], dtype=torch.float64))
            def forward(self, a, c):
                return (self.w * a).sum() + (c * self.b ** 2).sum()

        batches = [{"a": torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64),
                    "c": torch.tensor([1.0, 2.0], dtype=torch.float64)},
                   {"a": torch.tensor([[-3.0, -0.1], [0.2, -0.5]], dtype=torch.float64),
                    "c": torch.tensor([-1.0, 0.5], dtype=torch.float64)},
                   {"a": torch.tensor([[0.5, 2.0], [-1.0, 1.0]], dtype=torch.float64),
                    "c": torch.tensor([3.0, -2.0], dtype=torch.float64)}]
        model = Net()
        plugin = OPTIMIZERS.get("lion", "optim")(cfg.optim, model, max_steps=10)

        # by hand: c = b1 m + (1 - b1) g; theta -= lr (sign(c) + wd theta) (matrices only); m = b2 m + (1 - b2) g
        w, b = model.w.detach().clone(), model.b.detach().clone()
        mw, mb = torch.zeros_like(w), torch.zeros_like(b)
        for step, batch in enumerate(batches[:2]):
            gw, gb = batch["a"], 2 * batch["c"] * b
            w = w - lr * (torch.sign(b1 * mw + (1 - b1) * gw) + wd * w)
            b = b - lr * torch.sign(b1 * mb + (1 - b1) * gb)
            mw, mb = b2 * mw + (1 - b2) * gw, b2 * mb + (1 - b2) * gb
            plugin.compute(model, batch)
            out = plugin.apply(step)
            assert out["lr"] == lr, out
            assert torch.allclose(model.w.detach(), w, atol=1e-12), (step, model.w, w)
            assert torch.allclose(model.b.detach(), b, atol=1e-12), (step, model.b, b)

        # the momentum is checkpointed: a plugin restored from state_dict takes the same next step
        twin_model = copy.deepcopy(model)
        twin = OPTIMIZERS.get("lion", "optim")(cfg.optim, twin_model, max_steps=10)
        twin.load_state_dict(copy.deepcopy(plugin.state_dict()))  # as through torch.save / torch.load
        for p, m in ((plugin, model), (twin, twin_model)):
            p.compute(m, batches[2])
            p.apply(2)
        assert torch.equal(model.w, twin_model.w) and torch.equal(model.b, twin_model.b)
        print("ok")
    """))


def _easgd_rank(rank: int, world_size: int, site: str) -> dict:
    """One rank of an elastic step, exact (comm=none) and with QSGD (comm=qsgd)."""
    sys.path.insert(0, site)  # this spawned process only: the package and its entry points
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.sync import SYNC_STRATEGIES

    world = SimpleNamespace(rank=rank, world_size=world_size, async_group=None, device=torch.device("cpu"))
    cfg = OmegaConf.create({"name": "easgd", "period": 2, "beta": 0.6})
    comms = {"none": {"name": "none"},
             "qsgd": {"name": "qsgd", "levels": 4, "block_size": 8, "seed": 0, "feedback": "none",
                      "warmup_steps": 0, "min_numel": 0, "collective": "auto"}}
    out = {}
    for key, comm in comms.items():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)  # the same initial parameters on every rank
        meter = WireMeter()
        strategy = SYNC_STRATEGIES.get("easgd", "sync")(cfg, world, meter, model, OmegaConf.create(comm))
        centre = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # the workers move apart
            for i, p in enumerate(model.parameters()):
                p.add_(torch.linspace(-1, 1, p.numel()).view_as(p) * (rank + 1) + i)
        before = [p.detach().clone() for p in model.parameters()]
        assert strategy.after_step(0) == {}  # not the end of a period
        metrics = strategy.after_step(1)
        with strategy.eval_model() as m:
            evaluated = [p.detach().clone() for p in m.parameters()]
        out[key] = {"centre0": centre, "before": before, "after": [p.detach().clone() for p in model.parameters()],
                    "centre": strategy.centre.clone(), "evaluated": evaluated, "metrics": metrics,
                    "bytes": meter.totals["data"], "restored": [p.detach().clone() for p in model.parameters()]}
    return out


def test_easgd_elastic_step_on_two_ranks(site, tmp_path):
    ranks = run_fresh_ranks(_easgd_rank, 2, tmp_path, str(site))
    p, beta = 2, 0.6
    alpha = beta / p
    exact = [r["none"] for r in ranks]
    c0 = torch.cat([t.reshape(-1) for t in exact[0]["centre0"]])
    xs = [torch.cat([t.reshape(-1) for t in r["before"]]) for r in exact]
    ds = [x - c0 for x in xs]
    mean = (ds[0] + ds[1]) / p
    for x, d, r in zip(xs, ds, exact):
        after = torch.cat([t.reshape(-1) for t in r["after"]])
        assert torch.allclose(after, x - alpha * d, atol=1e-6)  # elastic pull toward the centre
        assert torch.allclose(r["centre"], c0 + beta * mean, atol=1e-6)  # the centre moves to the workers
        assert torch.equal(torch.cat([t.reshape(-1) for t in r["evaluated"]]), r["centre"])  # evaluated: the centre
        assert torch.equal(torch.cat([t.reshape(-1) for t in r["restored"]]), after)  # and swapped back
        assert r["bytes"] == 2 * (p - 1) / p * c0.numel() * 4  # one fp32 ring all-reduce, counted
        assert r["metrics"]["elastic_distance"] == pytest.approx(float(d.norm()), rel=1e-6)
    # through the comm layer, compressed: the centre is still identical on every rank, and close
    quant = [r["qsgd"] for r in ranks]
    assert torch.equal(quant[0]["centre"], quant[1]["centre"])
    # each of QSGD's two roundings (ranks' chunks, the owner's mean) errs by < ||d|| / s per value
    assert (quant[0]["centre"] - exact[0]["centre"]).abs().max() <= beta * 3 * max(d.norm() for d in ds) / 4
    assert 0 < quant[0]["bytes"] < exact[0]["bytes"]


# ---- EASGD's consensus state under the drift guard --------------------------------------
EASGD_RUN = ["experiment=tiny", "sync=easgd", "sync.period=2", "dist.nproc=2", "trainer.eval_every=1000",
             "trainer.checkpoint_every=1000", "trainer.sample_chars=0", "trainer.progress=false", "logger=none"]


@pytest.mark.extended  # ~25 s
def test_easgd_trains_300_steps_at_two_ranks_without_a_false_alarm(site, tmp_path):
    """The centre and round counter are checked every period (150 checks): never a false alarm."""
    p = run_train(site, *EASGD_RUN, "trainer.max_steps=300", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "drift guard off" not in p.stdout + p.stderr


@pytest.mark.extended  # ~8 s; test_drift.py checks the guard itself in the default tier
def test_one_ulp_drift_of_the_easgd_centre_stops_the_run_naming_it(site, tmp_path):
    p = run_train(site, *EASGD_RUN, "trainer.max_steps=8", "trainer.faults.drift_at=6", "trainer.faults.rank=1",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode != 0
    assert "replica drift after step 6: centre on rank 1 differs from rank 0" in p.stdout + p.stderr, p.stderr[-3000:]


# ---- all three in one run -------------------------------------------------------------
@pytest.mark.extended  # fresh ranks with the three plugins: ~12 s; each is checked alone in the default tier
@pytest.mark.slow
def test_all_three_in_one_training_run(site, tmp_path):
    run = tmp_path / "run"
    p = run_train(site, "experiment=tiny", "comm=qsgd", "comm.levels=8", "sync=easgd", "sync.period=2",
                  "optim=lion", "optim.lr=3e-4", "dist.nproc=2", "trainer.max_steps=8", "trainer.eval_every=4",
                  "trainer.checkpoint_every=8", "logger=none", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    for r in rows:
        data = r["wire_bytes"] - r["control_bytes"]
        if r["step"] % 2:  # local steps: nothing is sent (no DDP, no per-step agreement)
            assert data == 0 and "elastic_distance" not in r, r
        else:  # an elastic average of d_i in QSGD's int8 codes: about a quarter of fp32
            assert 0 < data < r["dense_bytes"] / 3 and r["elastic_distance"] > 0, r
    ckpt = run / "checkpoints" / "step_00000008"
    states = [torch.load(ckpt / f"rank0000{k}.pt", weights_only=False) for k in (0, 1)]
    assert torch.equal(states[0]["sync"]["centre"], states[1]["sync"]["centre"])  # the centre is shared
    assert states[0]["sync"]["round"] == 4
    assert any(not torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])
