"""The compose-time key rules, for every registered option of every group (built-in or from an
entry point): its own keys are reachable from the command line, a misspelt key and a key of
another option both fail with one line naming key and option, and defaults are written once."""
import ast
import dataclasses
import json
import os
import pathlib

import pytest
import yaml

from thinwire.config import ConfigError, compose, config_dir, expand_sweep, validate
from thinwire.config.groups import groups, schema_keys
from thinwire.options import defaults, option_keys

COMPATIBLE = {("model", "hf_classifier"): ["data=shakespeare_lines"], ("model", "mlp_digits"): ["data=digits"],
              ("data", "shakespeare_lines"): ["model=hf_classifier"], ("data", "digits"): ["model=mlp_digits"]}
OPTIONS = [(g, o) for g in groups() for o in groups()[g].options()]
# the default tier checks the first option of every group; the extended tier all the others
_FIRST = {g: groups()[g].options()[0] for g in groups() if groups()[g].options()}
OPTION_CASES = [pytest.param(g, o, id=f"{g}={o}", marks=() if _FIRST[g] == o else pytest.mark.extended)
                for g, o in OPTIONS]


def _value(v) -> str:
    """A value as a Hydra override writes it."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return json.dumps(v)
    return json.dumps(v)


def _select(group: str, option: str) -> list[str]:
    return [f"{group}={option}", *COMPATIBLE.get((group, option), [])]


@pytest.mark.parametrize("group,option", OPTION_CASES)
def test_every_option_key_rules(group, option):
    g = groups()[group]
    cfg = compose(_select(group, option))
    validate(cfg)
    keys = schema_keys(g.schema(option))
    assert set(cfg[group].keys()) == set(keys)
    # every own key is reachable from the command line (set to its default: still valid)
    own = defaults(g.own(option))
    settable = [f"{group}.{k}={_value(v)}" for k, v in own.items()
                if v != "???" and not isinstance(v, dict) and k not in ("block_size", "tokenizer")]
    if settable:
        validate(compose([*_select(group, option), *settable]))
    # a misspelt key: one line naming key and option, with a did-you-mean for a near miss
    probe = (list(own) or list(keys))[0]
    with pytest.raises(ConfigError) as e:
        compose([*_select(group, option), f"{group}.{probe}x=1"])
    assert str(e.value).startswith(f"{group}.{probe}x: not an option of {group}={option}")
    assert f"did you mean {group}.{probe}?" in str(e.value) and "\n" not in str(e.value)
    # a key of another option of the group: rejected, naming who has it; ++ drops it
    others = {k: o for o in g.options() for k in option_keys(g.own(o)) if k not in keys}
    for key, other in list(others.items())[:2]:
        with pytest.raises(ConfigError, match=rf"^{group}\.{key}: not an option of {group}={option}\b.* \(.*{other}"):
            compose([*_select(group, option), f"{group}.{key}=1"])
        assert key not in compose([*_select(group, option), f"++{group}.{key}=1"])[group]


def test_where_it_exists_form_in_a_mixed_sweep():
    jobs = expand_sweep(["comm=topk,int8", "++comm.ratio=0.05", "++comm.block_size=512"])
    topk, int8 = (compose(j).comm for j in jobs)
    assert topk.ratio == 0.05 and "block_size" not in topk
    assert int8.block_size == 512 and "ratio" not in int8


def test_feedback_keys_belong_to_their_rule():
    assert compose(["comm=topk", "comm.feedback=ef21m", "comm.eta=0.2"]).comm.eta == 0.2
    with pytest.raises(ConfigError, match=r"comm.init=zero: not an option of comm.feedback=econtrol"):
        validate(compose(["comm=topk", "comm.feedback=econtrol", "comm.collective=allgather", "comm.init=zero"]))


def test_previously_unreachable_options_are_settable():
    c = compose(["comm=randk", "comm.unbiased=true", "comm.sampling=uniform", "comm.feedback=none"]).comm
    assert c.unbiased is True and c.sampling == "uniform"
    assert compose(["comm=ternary", "comm.alpha=0.5"]).comm.alpha == 0.5


def test_diloco_is_a_preset_of_local():
    s = compose(["sync=diloco"]).sync
    assert s.name == "local" and dict(s.outer_optim) == {"_target_": "torch.optim.SGD", "lr": None,
                                                          "momentum": 0.9, "nesterov": True}  # lr: tuned per H
    with pytest.raises(ConfigError, match="sync.staleness_penalty: not an option of sync=local"):
        compose(["sync=diloco", "sync.staleness_penalty=1"])


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("group", list(groups()))
def test_option_yamls_do_not_restate_defaults(group):
    """Defaults are written once, next to the part: an option's YAML sets group-wide presets
    and interpolations only, never a value for one of the option's own keys."""
    d = pathlib.Path(config_dir()) / group
    for f in d.glob("*.yaml"):
        body = yaml.safe_load(f.read_text()) or {}
        option = body.get("name", f.stem)
        if option not in groups()[group].entries():
            continue
        own = set(option_keys(groups()[group].own(option)))
        for key, value in body.items():
            if key in ("defaults", "name") or (isinstance(value, str) and value.startswith("${")):
                continue
            assert key not in own or f.stem != option, f"{f.name} sets {key}, a default of {group}={option}"


def test_lower_layers_do_not_import_the_trainer():
    """comm/, optim/, models/, data/ (and errors, options, registry) never import thinwire.trainer
    or thinwire.config."""
    pkg = ROOT / "thinwire"
    for sub in ("comm", "optim", "models", "data"):
        for path in (pkg / sub).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..<package> import
                    top = (node.module or "").split(".")[0]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    top = (node.module or "").removeprefix("thinwire.") if node.module.startswith("thinwire.") else ""
                else:
                    continue
                assert top.split(".")[0] not in ("trainer", "config"), f"{path.relative_to(ROOT)} imports {top}"
