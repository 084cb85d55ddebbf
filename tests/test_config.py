"""Config tests: every group option and preset composes; bad input exits 2 naming the key."""
import os
import subprocess
import sys

import pytest

from thinwire.train import main
from thinwire.config import ConfigError, compose, config_dir
from thinwire.config import validate


def _options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(config_dir(), group)) if f.endswith(".yaml"))


GROUP_OPTIONS = [(g, o) for g in ("model", "data", "comm", "sync", "optim", "peft", "engine", "trainer",
                                  "dist", "logger") for o in _options(g)]
COMPATIBLE = {"model": {"hf_classifier": ["data=shakespeare_lines"], "mlp_digits": ["data=digits"]},
              "data": {"shakespeare_lines": ["model=hf_classifier"], "digits": ["model=mlp_digits"]}}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    extra = COMPATIBLE.get(group, {}).get(option, [])
    cfg = compose([f"{group}={option}", *extra])
    validate(cfg)
    assert cfg.run_dir


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes(preset):
    cfg = compose([f"experiment={preset}"])
    validate(cfg)


def test_presets_hold_deltas_only():
    tiny = compose(["experiment=tiny"])
    base = compose([])
    assert tiny.model.n_layer == 2 and base.model.n_layer == 4
    assert tiny.optim.name == base.optim.name  # untouched groups keep their defaults


def test_schema_rejects_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="comm.ratioo"):
        compose(["comm.ratioo=0.1"])
    with pytest.raises(ConfigError, match="max_steps"):
        compose(["trainer.max_steps=lots"])


BAD = [
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["dist.nproc=0"], "dist.nproc=0"),
    (["trainer.eval_every=0"], "trainer.eval_every=0"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1"),
    (["comm=bogus"], "comm"),
    (["optim=bogus"], "optim"),
    (["optim.name=nadam"], "optim.name=nadam: choose the option with optim=nadam"),
    (["sync.name=gossip"], "sync.name=gossip"),
    (["engine.name=horovod"], "engine.name=horovod"),
    (["comm=int8", "comm.ratio=0.3"], "comm.ratio: not an option of comm=int8"),
    (["sync=local", "sync.staleness_penalty=7"], "sync.staleness_penalty: not an option of sync=local"),
    (["optim=adamw", "optim.momentum=0.5"], "optim.momentum: not an option of optim=adamw"),
    (["optim=adamw", "optim.zo_samples=9"], "optim.zo_samples: not an option of optim=adamw"),
    (["comm=topk", "comm.feedback=ef", "comm.eta=0.3"], "comm.eta=0.3: not an option of comm.feedback=ef"),
    (["+comm.foo=1"], "+comm.foo: options have fixed keys"),
    (["~comm"], "~comm: cannot be deleted"),
    (["~comm.feedback"], "~comm.feedback: cannot be deleted"),
    (["++comm.nothing_has_this=1"], "comm.nothing_has_this: not an option of comm=none"),
    (["comm.feedback=ef"], "comm.feedback=ef"),
    (["comm.feedback=magic"], "comm.feedback=magic"),
    (["comm=topk", "comm.ratio=1.5"], "comm.ratio=1.5"),
    (["comm.eta=-0.1"], "comm.eta=-0.1"),
    (["sync=local", "sync.local_steps=0"], "sync.local_steps=0"),
    (["sync=co2", "sync.outer_optim.momentum=-0.1"], "sync.outer_optim="),
    (["sync=local", "sync.outer_optim._target_=torch.optim.Nope"], "sync.outer_optim._target_=torch.optim.Nope"),
    (["sync=local", "sync.outer_optim._target_=torch.nn.Linear"], "must be a torch.optim.Optimizer subclass"),
    (["sync=local", "+sync.outer_optim.foo=1"], "unexpected keyword argument 'foo'"),
    (["+trainer.faults.foo=1"], "trainer.faults.foo: not an option of trainer"),
    (["sync=co2", "sync.clip=0"], "sync.clip=0"),
    (["sync=co2", "sync.clip_mode=elementwise"], "sync.clip_mode=elementwise"),
    (["sync=local", "sync.outer_optim.lr=-1"], "Invalid learning rate"),
    (["sync=co2", "sync.staleness_penalty=-1"], "sync.staleness_penalty=-1"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim=sgd", "optim.momentum=1.0"], "optim.momentum=1.0"),
    (["optim.schedule=linear"], "optim.schedule=linear"),
    (["model.block_size=10000000"], "block_size=10000000: is larger than the validation text"),
    (["model.n_head=3"], "model.n_head=3"),
    (["dist.backend=mpi"], "dist.backend=mpi"),
    (["logger.mode=cloud"], "logger.mode=cloud"),
    (["experiment=digits", "model.arch=rnn"], "model.arch=rnn"),
    (["experiment=minilm_genre", "model.path=/nonexistent/model"], "model.path=/nonexistent/model"),
    (["trainer.resume=/nonexistent/ckpt"], "trainer.resume=/nonexistent/ckpt"),
    (["trainer.max_steps=ten"], "trainer.max_steps"),
    (["optim=mezo", "optim.zo_eps=0"], "optim.zo_eps=0"),
    (["optim=mezo", "optim.zo_accum=3"], "optim.zo_accum=3"),
    (["optim=zo_dist", "optim.zo_mode=ring"], "optim.zo_mode=ring"),
    (["optim=zo_dist", "optim.zo_samples=-1"], "optim.zo_samples=-1"),
    (["optim=mezo", "comm=topk"], "comm=topk"),
    (["optim=zo_dist", "sync=co2"], "sync=co2"),
    (["peft=lora_ga", "peft.ga_batches=0"], "peft.ga_batches=0"),
    (["peft=lora_ga", "peft.ga_direction=BrAr"], "peft.ga_direction=BrAr"),
    (["peft=lora_ga", "peft.ga_init=magic"], "peft.ga_init=magic"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_exits_2_with_one_line_naming_key(overrides, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*overrides, f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("thinwire-train: error:") and needle in err, err
    assert "Traceback" not in err


def test_unreadable_checkpoint_is_rejected(tmp_path, capsys):
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text('{"version": 1, "step": 10, "world_size": 1}')
    (ckpt / "common.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as exc:
        main([f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    assert "common.pt is unreadable" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_exit_status_and_stderr(tmp_path):
    """The real process: exit 2, one stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "thinwire.train", "trainer.max_steps=0",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["thinwire-train: error: trainer.max_steps=0: must be positive"]
