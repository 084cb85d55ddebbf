"""The README's plugin-authoring examples, installed as a package with entry points (a
dist-info directory on PYTHONPATH) and checked in a fresh interpreter (entry points are
read once per process)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section(title: str) -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The README's pyproject snippet and modules as an installed distribution."""
    root = tmp_path_factory.mktemp("site")
    section = readme_section("Plugin authoring")
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    toml = [b for lang, b in blocks if lang == "toml"]
    assert len(toml) == 1
    groups = tomllib.loads(toml[0])["project"]["entry-points"]
    assert set(groups) == {"thinwire.compressors", "thinwire.optim"}
    info = root / "readme_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: readme-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items()))
    modules = [b for lang, b in blocks if lang == "python"]
    assert len(modules) == 2
    for code in modules:
        name = re.match(r"# (\w+\.py)\n", code).group(1)
        (root / name).write_text(code)
    return root


def run_py(site, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_compressor_plugin_by_name(site):
    p = run_py(site, """
        import torch
        from thinwire.comm import build_compressor, comm_hook

        c = build_compressor("half")
        t = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
        payload = c.compress(t)
        assert payload.nbytes == 2 * t.numel(), payload.nbytes
        back = c.decompress(payload)
        assert back.dtype == torch.float32 and back.shape == t.shape
        assert torch.equal(back, t.to(torch.float16).to(torch.float32))   # the reference cast
        state, hook = comm_hook("half", feedback="ef")
        print("ok")
    """)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_optimizer_plugin_steps_at_half_the_rate(site):
    p = run_py(site, """
        import torch
        from thinwire.optim.plugins import OPTIMIZERS
        from thinwire.config import compose
        from thinwire.config import validate

        cfg = compose(["experiment=tiny", "optim=halfsgd", "optim.lr=0.3", "optim.momentum=0.9",
                       "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=0",
                       "optim.weight_decay=0"])
        validate(cfg)
        assert cfg.optim.name == "halfsgd" and cfg.optim.nesterov is False   # SGDOptions' keys

        class Quadratic(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
            def forward(self, x):
                return ((self.w * x) ** 2).sum()

        model = Quadratic()
        plugin = OPTIMIZERS.get("halfsgd", "optim")(cfg.optim, model, max_steps=10)
        x = torch.tensor([1.0, 0.5, 2.0])
        w0 = model.w.detach().clone()
        plugin.compute(model, {"x": x})
        out = plugin.apply(1)
        grad = 2 * w0 * x * x                       # d/dw sum (w x)^2
        assert out["lr"] == 0.15, out
        assert torch.allclose(model.w.detach(), w0 - 0.15 * grad), (model.w, w0 - 0.15 * grad)
        print("ok")
    """)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_compressor_plugin_in_trainer_config(site):
    p = run_py(site, """
        from thinwire.config import compose
        from thinwire.config import validate

        cfg = compose(["comm=half", "comm.feedback=ef"])
        validate(cfg)
        assert cfg.comm.name == "half" and cfg.comm.feedback == "ef"
        print("ok")
    """)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
