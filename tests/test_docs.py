"""The commands of docs/*.md, run as a newcomer would (the extended tier).

- every command in a ```bash block of docs/*.md, by tests/test_readme.py's rules (with tiny
  step counts), or skipped for a stated reason (DOC_SKIP: a GPU, root or a cluster, a
  benchmark, a placeholder, or another test that runs it); a new command fails here until
  it is covered;

- ``pip install -e docs/examples`` (docs/extending.md), verbatim, in a fresh virtual
  environment that sees this interpreter's packages through a ``.pth`` file (thinwire and
  its dependencies are there, so nothing but the build back-end is fetched: pip builds in
  isolation, as for a newcomer, from the index that launch/setup_env.sh used, i.e. pip's own
  configuration); afterwards both example packages import from the installation, the
  three entry points are found, and docs/extending.md's commands compose and validate with
  the package installed (``--cfg job``; the one the doc shows failing exits 2 with its line).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import REPO

INSTALL = "pip install -e docs/examples"
DOCS = sorted(f for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
DOC_SKIP = {
    "launch/netsim": "network namespaces as root (tests/test_netsim.py runs launch/netsim)",
    "PYTHON=$(which python) launch/netsim": "network namespaces as root (tests/test_netsim.py)",
    "pytest -m gpu": "needs CUDA (the GPU tier)",
    "bash tools/gpu_check.sh": "needs CUDA (the GPU tier)",
    "thinwire-train <row>": "a placeholder for a row of the table above it",
    "thinwire-report multirun/<": "a placeholder for a sweep's timestamped directory",
    "for c in none topk int8; do sbatch": "SLURM submissions (tests/test_launch.py dry-runs launch/slurm.sbatch)",
    "cd docs/examples": "docs/your_model.md's commands: tests/test_your_model.py runs them from docs/examples",
    "thinwire-train model._target_=my_project": "tests/test_your_model.py runs it from docs/examples",
    "thinwire-train 'hydra.searchpath=[pkg://my_project.configs]'": "tests/test_your_model.py runs it",
    "thinwire-train experiment=tiny comm=qsgd": "needs the examples installed: validated after the install below",
    "thinwire-train experiment=tiny sync=easgd": "needs the examples installed: validated after the install below",
    "thinwire-train experiment=tiny optim=lion": "needs the examples installed: validated after the install below",
    "thinwire-train engine=fsdp2 engine.shard_group_size=2": "4 ranks: tests/test_fsdp2.py runs the same through the trainer",
    "python tools/exit_abort_drill.py": "hundreds of launches, minutes (tests/test_exit_abort.py is its CI check)",
}


def fresh_venv(root) -> tuple[str, dict]:
    """A venv at ``root`` whose ``pip`` is this interpreter's pip, seeing this interpreter's
    site-packages after its own; the environment to run commands in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_test_parent_site.pth"), "w") as fh:  # addsitedir: its .pth files too
        fh.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    pip = root / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{py}" -m pip "$@"\n')
    pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{root / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(root), PIP_RETRIES="0",
               PIP_TIMEOUT="10", PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="disabled")
    return str(py), env


@pytest.mark.extended  # about 100 s: pip fetches the build back-end
@pytest.mark.slow
def test_pip_install_e_docs_examples_verbatim_in_a_fresh_venv(tmp_path):
    assert f"`{INSTALL}`" in open(os.path.join(REPO, "docs", "extending.md")).read()
    py, env = fresh_venv(tmp_path / "venv")
    p = subprocess.run(INSTALL, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    check = textwrap.dedent("""
        import importlib.metadata as md, importlib.resources as res, os
        import my_project.models, my_project.data, thinwire_examples
        eps = {(e.group, e.name) for e in md.distribution("thinwire-examples").entry_points}
        assert eps == {("thinwire.compressors", "qsgd"), ("thinwire.sync", "easgd"), ("thinwire.optim", "lion")}, eps
        assert res.files("my_project.configs").joinpath("model", "tiny_hf_lm.yaml").is_file()
        print(os.path.dirname(thinwire_examples.__file__))
    """)
    # from another directory: the packages come from the installation, not the working directory
    q = subprocess.run([py, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr[-3000:]
    assert q.stdout.strip() == os.path.join(REPO, "docs", "examples", "thinwire_examples")  # editable
    # docs/extending.md's commands, with the package installed: each composes and validates
    # (``--cfg job``: the entry points are found, the options parse); the one the doc shows
    # failing exits 2 with the doc's line
    from test_readme import readme_commands

    for cmd in readme_commands(path=os.path.join("docs", "extending.md")):
        argv = shlex.split(cmd)
        assert argv[0] == "thinwire-train", cmd
        r = subprocess.run([py, "-m", "thinwire.train", *argv[1:], "--cfg", "job"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        if "comm.levels=200" in argv:
            assert r.returncode == 2 and "comm.levels=200: must be an int in [1, 127]" in r.stderr, (cmd, r.stderr)
        else:
            assert r.returncode == 0 and "optim:" in r.stdout, (cmd, r.stderr[-2000:])


@pytest.mark.extended  # ~20 s: a few dozen commands, two steps each on the pooled ranks
@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_docs_commands_run_verbatim(doc, tmp_path, pools, capsys, monkeypatch):
    from test_readme import SKIP, readme_commands, run_verbatim

    commands = readme_commands(path=os.path.join("docs", doc))
    run_verbatim(commands, set(), tmp_path, pools, capsys, monkeypatch, skip_rules={**SKIP, **DOC_SKIP})
