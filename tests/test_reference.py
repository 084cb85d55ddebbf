"""docs/config_reference.md is generated from the schemas and configs/, and is current."""
from __future__ import annotations

import dataclasses
import os

from thinwire.trainer import reference
from thinwire.config import config_dir
from thinwire.trainer.schema import SCHEMAS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "config_reference.md")


def test_committed_reference_is_current():
    current = open(DOC).read()
    assert current == reference.render(config_dir()), (
        "docs/config_reference.md is out of date: run `python -m thinwire.trainer.reference` and commit it")


def _fields(cls, prefix=""):
    """Every (dotted key, type) of a schema, nested schemas included (from dataclasses)."""
    for f in dataclasses.fields(cls):
        if f.name == "_target_":
            continue
        yield f"{prefix}{f.name}", f.type
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{f.name}.")


def test_every_key_and_option_file_is_listed():
    text = reference.render(config_dir())
    for group, schemas in SCHEMAS.items():
        assert f"## `{group}`" in text
        for cls in schemas.values():
            for key, typ in _fields(cls):
                assert f"| `{key}` | `{typ}` |" in text, (group, key)
    root = config_dir()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml") and dirpath != root:
                assert f"`{os.path.relpath(os.path.join(dirpath, f), root)}`" in text, f


def test_rows_carry_types_defaults_and_comments():
    """Rows written here by hand from schema.py and configs/."""
    text = reference.render(config_dir())
    assert "| `ratio` | `float` | `0.01` | density for topk / randk / ternary |" in text
    assert "| `faults.kill_at` | `Optional[int]` | `null` | SIGKILL this rank after that step |" in text
    assert "| `nproc` | `int` | `2` | workers thinwire-train starts when not under torchrun |" in text
    assert "| `betas` | `list[float]` | `[0.9, 0.95]` |" in text
    # a schema field without a comment of its own takes the one beside it in its option file
    assert "| `batch_size` | `int` | `16` | per rank |" in text
    assert "Options (default: `gpt_char`): `gpt_char`, `hf_classifier`, `mlp_digits`." in text
    topk = next(ln for ln in text.splitlines() if ln.startswith("| `comm/topk.yaml` |"))
    assert "`ratio=0.01`" in topk and "`feedback=ef`" in topk and "Top-K sparsification" in topk
    tiny = next(ln for ln in text.splitlines() if ln.startswith("| `experiment/tiny.yaml` |"))
    assert "`model.n_layer=2`" in tiny and "`logger.mode=disabled`" in tiny
    assert "| `gpus_per_node` | `${dist.nproc}` | one GPU per worker |" in text


def test_check_mode(tmp_path, capsys):
    out = str(tmp_path / "ref.md")
    assert reference.main(["--check", "--out", out]) == 1
    assert "out of date" in capsys.readouterr().err
    assert reference.main(["--out", out]) == 0
    assert reference.main(["--check", "--out", out]) == 0
    assert open(out).read() == reference.render(config_dir())
