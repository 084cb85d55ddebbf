"""Every bad input is one line: exit status 2, one stderr line naming the key (and value),
no traceback, the run dir untouched, before any process or process group starts.

Each case runs in this process through the CLI's entry function (``thinwire.train.main``)
with captured stderr, so none starts an interpreter or torch. ``launch_local`` is replaced by
a trap: a case that passes validation would start workers, and fails instead.

Cases that need workers, and so are not here: a resume whose checkpoint is readable but whose
contents only a worker can judge (a rank file that unpickles but holds other buffers), and
``peft.target_modules`` naming modules that only the built model reveals (hf_classifier).
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import thinwire.train as cli
from test_config import BAD as CONFIG_BAD



def _file(path, text="not a directory\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ckpt(tmp, name="ckpt", ranks=2, truncate=None, common=None, manifest=True):
    """A checkpoint directory as thinwire writes it (COMPLETE, common.pt, rank files)."""
    d = tmp / name
    d.mkdir(parents=True)
    if manifest:
        (d / "COMPLETE").write_text(json.dumps({"version": 1, "step": 10, "world_size": ranks}))
    torch.save(common if common is not None else {"version": 1, "step": 10}, d / "common.pt")
    for r in range(ranks):
        torch.save({"params": [torch.zeros(4)]}, d / f"rank{r:05d}.pt")
    if truncate is not None:
        p = d / truncate
        p.write_bytes(p.read_bytes()[:40])
    return d


# (id, overrides, needle, setup(tmp) -> run dir override or None); "{tmp}" in an override is tmp_path
def C(overrides, needle, setup=None, id=None):
    return pytest.param(overrides, needle, setup, id=id or " ".join(overrides))


NEW = [
    # ---- item 7 of issue 14 (static cases) ----
    C(["data=digits"], "data=digits"),
    C(["model=gpt_char", "data=shakespeare_lines"], "data=shakespeare_lines"),
    C(["model=mlp_digits"], "model=mlp_digits"),
    C(["model=hf_classifier", "data=digits"], "data=digits"),
    C(["model=mlp_digits", "data=shakespeare_lines"], "data=shakespeare_lines"),
    C(["data.batch_size=1e9"], "data.batch_size=1e9"),
    C(["data.batch_size=1000000000"], "data.batch_size=1000000000"),
    C(["model.n_layer=1e6"], "model.n_layer=1e6"),
    C(["model.n_layer=1000000"], "model.n_layer=1000000"),
    C(["model.n_embd=1048576"], "model.n_embd=1048576"),
    C(["optim.eps=-1"], "optim.eps=-1"),
    C(["optim.eps=nan"], "optim.eps=nan"),
    C(["optim.eps=0"], "optim.eps=0"),
    C(["trainer.seed=1e20"], "trainer.seed=1e20"),
    C(["trainer.seed=100000000000000000000"], "trainer.seed=100000000000000000000"),
    C(["trainer.seed=-1"], "trainer.seed=-1"),
    C(["dist.timeout_s=inf"], "dist.timeout_s=inf"),
    C(["dist.timeout_s=0"], "dist.timeout_s=0"),
    C(["dist.master_addr=127.0.0.1:99999"], "dist.master_addr=127.0.0.1:99999"),
    C(["dist.master_addr=''"], "dist.master_addr="),
    C(["dist.master_addr=not a host"], "dist.master_addr=not a host"),
    C(["comm=int8", "comm.block_size=1e12"], "comm.block_size=1e12"),
    C(["comm=int8", "comm.block_size=1000000000000"], "comm.block_size=1000000000000"),
    C(["comm=sign1", "comm.block_size=4"], "comm.block_size=4"),
    C(["comm=dynamic8", "comm.block_size=1000000000000"], "comm.block_size=1000000000000"),
    C(["trainer.sample_chars=1e9"], "trainer.sample_chars=1e9"),
    C(["trainer.sample_chars=1000000000"], "trainer.sample_chars=1000000000"),
    C(["trainer.sample_chars=-1"], "trainer.sample_chars=-1"),
    C(["data.eval_batches=1e9"], "data.eval_batches=1e9"),
    C(["data.eval_batches=1000000000"], "data.eval_batches=1000000000"),
    C(["++trainer.bogus=1"], "trainer.bogus"),
    C(["++dist.bogus=1"], "dist.bogus"),
    C(["+trainer.bogus=1"], "trainer.bogus"),
    C(["~sync"], "~sync: cannot be deleted"),
    C(["~trainer.max_steps"], "~trainer.max_steps"),
    C(["trainer.faults.rank=5", "dist.nproc=2"], "trainer.faults.rank=5"),
    C(["trainer.faults.rank=-1"], "trainer.faults.rank=-1"),
    C(["trainer.faults.rank=2", "dist.nproc=2", "trainer.faults.nan_at=3"], "trainer.faults.rank=2"),
    C(["trainer.faults.nan_at=0"], "trainer.faults.nan_at=0"),
    C(["trainer.faults.error_at=-2"], "trainer.faults.error_at=-2"),
    C(["trainer.faults.drift_at=0"], "trainer.faults.drift_at=0"),
    C(["trainer.drift_check_every=-1"], "trainer.drift_check_every=-1"),
    C(["peft=lora", "peft.target_modules=[nonexistent]"], "peft.target_modules=['nonexistent']"),
    C(["peft=lora", "peft.modules_to_train=[nonexistent]"], "peft.modules_to_train=['nonexistent']"),
    C(["peft=lora", "peft.r=0"], "peft.r=0"),
    C(["peft=lora", "peft.dropout=1.5"], "peft.dropout=1.5"),
    C(["peft=lora", "peft.r=many"], "peft.r=many"),
    C(["peft=lora_ga", "peft.ga_scale=huge"], "peft.ga_scale=huge"),
    C(["peft=lora_ga", "peft.ga_gamma=0"], "peft.ga_gamma=0"),
    # ---- the run dir ----
    C(["hydra.run.dir={tmp}/a_file"], "a_file", lambda t: _file(t / "a_file"), id="run dir is a file"),
    C(["hydra.run.dir={tmp}/a_file/sub"], "a_file/sub", lambda t: _file(t / "a_file"),
      id="run dir under a file"),
    C(["hydra.run.dir=/proc/thinwire_run"], "/proc/thinwire_run", id="run dir in /proc"),
    C(["hydra.run.dir=/proc/self/thinwire_run"], "/proc/self/thinwire_run", id="run dir in /proc/self"),
    C(["hydra.run.dir={tmp}/ro/run"], "ro/run", lambda t: (t / "ro").mkdir(mode=0o500), id="unwritable run dir"),
    C(["hydra.run.dir={tmp}/run"], "checkpoints", lambda t: _file(t / "run" / "checkpoints"),
      id="checkpoints is a file"),
    C(["hydra.run.dir={tmp}/run"], "metrics.jsonl", lambda t: (t / "run" / "metrics.jsonl").mkdir(parents=True),
      id="metrics.jsonl is a directory"),
    # ---- resume ----
    C(["trainer.resume={tmp}/nonexistent"], "trainer.resume=", id="resume nonexistent path"),
    C(["trainer.resume={tmp}/garbage"], "trainer.resume=", lambda t: _file(t / "garbage", "\x00garbage\x01" * 50),
      id="resume a garbage file"),
    C(["trainer.resume={tmp}/ckpt"], "trainer.resume=", lambda t: _ckpt(t, truncate="rank00001.pt"),
      id="resume truncated rank file"),
    C(["trainer.resume={tmp}/ckpt"], "trainer.resume=", lambda t: _ckpt(t, truncate="common.pt"),
      id="resume truncated common file"),
    C(["trainer.resume={tmp}/ckpt"], "trainer.resume=", lambda t: _ckpt(t, manifest=False),
      id="resume without COMPLETE"),
    C(["trainer.resume={tmp}/ckpt"], "trainer.resume=", lambda t: (t / "ckpt").mkdir(),
      id="resume an empty directory"),
    C(["trainer.resume=auto", "trainer.overwrite=true"], "trainer.overwrite=True"),
    C(["trainer.resume=later"], "trainer.resume=later"),
    # ---- more, per group: wrong types, negative sizes, out-of-range values, unknown names ----
    C(["model.n_embd=-64"], "model.n_embd=-64"),
    C(["model.dropout=1"], "model.dropout=1"),
    C(["model.bias=maybe"], "model.bias=maybe"),
    C(["model.block_size=0"], "model.block_size=0"),
    C(["model=transformer_xl"], "model=transformer_xl"),
    C(["experiment=digits", "model.hidden=0"], "model.hidden=0"),
    C(["data=shakespear"], "data=shakespear"),
    C(["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    C(["data.val_fraction=0"], "data.val_fraction=0"),
    C(["data.eval_batches=0"], "data.eval_batches=0"),
    C(["data.batch_size=-8"], "data.batch_size=-8"),
    C(["data.batch_size=sixteen"], "data.batch_size=sixteen"),
    C(["experiment=minilm_genre", "data.max_length=0"], "data.max_length=0"),
    C(["experiment=minilm_genre", "data.min_chars=-1"], "data.min_chars=-1"),
    C(["comm=topk", "comm.ratio=0"], "comm.ratio=0"),
    C(["comm=topk", "comm.ratio=-0.5"], "comm.ratio=-0.5"),
    C(["comm=topk", "comm.ratio=lots"], "comm.ratio=lots"),
    C(["comm=topk", "comm.value_dtype=fp8"], "comm.value_dtype=fp8"),
    C(["comm=topk", "comm.index_coding=huffman"], "comm.index_coding=huffman"),
    C(["comm=randk", "comm.sampling=magic"], "comm.sampling=magic"),
    C(["comm=randk", "comm.ratio=2"], "comm.ratio=2"),
    C(["comm=ternary", "comm.alpha=-1"], "comm.alpha=-1"),
    C(["comm=chunk_topk", "comm.bits=0"], "comm.bits=0"),
    C(["comm=chunk_topk", "comm.bits=64"], "comm.bits=64"),
    C(["comm=chunk_topk", "comm.k=0"], "comm.k=0"),
    C(["comm=chunk_topk", "comm.k=8192"], "comm.k=8192"),
    C(["comm=chunk_topk", "comm.chunk=0"], "comm.chunk=0"),
    C(["comm=chunk_topk", "comm.mean=median"], "comm.mean=median"),
    C(["comm.collective=broadcast"], "comm.collective=broadcast"),
    C(["comm.warmup_steps=-1"], "comm.warmup_steps=-1"),
    C(["comm.min_numel=-1"], "comm.min_numel=-1"),
    C(["comm=topk", "comm.feedback=ef", "comm.ef_decay=1.5"], "comm.ef_decay=1.5"),
    C(["comm=topk", "comm.feedback=ef21", "comm.init=random"], "comm.init=random"),
    C(["comm=topk", "comm.feedback=econtrol", "comm.eta=2"], "comm.eta=2"),
    C(["sync=local", "sync.local_steps=-4"], "sync.local_steps=-4"),
    C(["sync=local", "sync.local_steps=1e9"], "sync.local_steps=1e9"),
    C(["sync=local", "sync.clip=-1"], "sync.clip=-1"),
    C(["sync=local", "sync.outer_optim.lr=inf"], "sync.outer_optim.lr=inf"),
    C(["sync=local", "sync.outer_optim.lr=nan"], "sync.outer_optim.lr=nan"),
    C(["sync=fedavg"], "sync=fedavg"),
    # issue 16: eager overlap, streaming fragments, inner-moment averaging
    C(["sync=local", "sync.local_steps=8", "sync.fragments=3"], "sync.fragments=3"),
    C(["sync=local", "sync.local_steps=8", "sync.fragments=2", "sync.fragment_delay=4"], "sync.fragment_delay=4"),
    C(["sync=local", "sync.local_steps=8", "sync.fragments=8"], "sync.fragments=8"),
    C(["sync=local", "sync.fragment_alpha=1.5"], "sync.fragment_alpha=1.5"),
    C(["sync=local", "sync.moment1_every=-1"], "sync.moment1_every=-1"),
    C(["sync=local", "sync.moment2_every=2", "engine=deepspeed"], "sync.moment1_every=0"),
    C(["sync=local", "sync.fragments=2", "engine=deepspeed"], "sync.fragments=2"),
    C(["sync=co2", "sync.overlap=lazy"], "sync.overlap=lazy"),
    C(["sync=co2", "sync.overlap=eager", "sync.staleness_penalty=0.5"], "sync.staleness_penalty=0.5"),
    C(["sync=co2", "sync.fragments=2", "sync.fragment_delay=1"], "sync.fragment_delay=1: sync=co2 merges each fragment"),
    C(["optim.lr=-0.1"], "optim.lr=-0.1"),
    C(["optim.lr=inf"], "optim.lr=inf"),
    C(["optim.lr=1e300"], "optim.lr=1e+300"),
    C(["optim.weight_decay=-1"], "optim.weight_decay=-1"),
    C(["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
    C(["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2"),
    C(["optim.schedule=wsd", "optim.warmup_steps=20", "optim.decay_start=10"], "optim.decay_start=10"),
    C(["optim.schedule=cosine", "optim.decay_start=100"], "optim.decay_start=100"),
    C(["optim.betas=[0.9]"], "optim.betas="),
    C(["optim.betas=[1.5,0.9]"], "optim.betas="),
    C(["optim.grad_clip=-1"], "optim.grad_clip=-1"),
    C(["optim=sgd", "optim.momentum=-0.5"], "optim.momentum=-0.5"),
    C(["optim=mezo", "optim.zo_chunk=0"], "optim.zo_chunk=0"),
    C(["optim=zo_dist", "optim.zo_qstep=0"], "optim.zo_qstep=0"),
    C(["optim=lion"], "optim=lion"),
    C(["engine=deepspeed", "engine.zero_group_size=0"], "engine.zero_group_size=0"),
    C(["engine=horovod"], "engine=horovod"),
    C(["engine.bucket_cap_mb=-1"], "engine.bucket_cap_mb=-1"),
    C(["trainer.max_steps=1.5"], "trainer.max_steps=1.5"),
    C(["trainer.log_every=0"], "trainer.log_every=0"),
    C(["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1"),
    C(["trainer.max_skipped_steps=-1"], "trainer.max_skipped_steps=-1"),
    C(["trainer.stop_after=0"], "trainer.stop_after=0"),
    C(["trainer.progress=sometimes"], "trainer.progress=sometimes"),
    C(["dist.nproc=-2"], "dist.nproc=-2"),
    C(["dist.nproc=two"], "dist.nproc=two"),
    C(["dist.threads=-1"], "dist.threads=-1"),
    C(["dist.max_restarts=-1"], "dist.max_restarts=-1"),
    C(["dist.backend=nccl2"], "dist.backend=nccl2"),
    C(["logger=tensorboard"], "logger=tensorboard"),
    C(["logger=wandb", "logger.mode=loud"], "logger.mode=loud"),
    C(["experiment=huge"], "experiment=huge"),
]

# test_config.py's table again, through the CLI's entry function and the run-dir check: the
# extended tier (the default tier checks the same inputs in test_config.py)
OLD = [pytest.param(o, n, None, id="config: " + " ".join(o), marks=pytest.mark.extended) for o, n in CONFIG_BAD]
CASES = OLD + NEW


def _tree(root) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module", autouse=True)
def _imports_done(tmp_path_factory):
    """Pay the one-time imports (hydra, the registries, peft, the data packages) before the
    cases are timed."""
    from thinwire.config import compose, validate
    from thinwire.data.shakespeare import load_texts

    compose(["peft=lora"])
    validate(compose(["experiment=digits", f"hydra.run.dir={tmp_path_factory.mktemp('warmup')}/run"]))
    load_texts()
    import peft  # noqa: F401


def test_table_size():
    assert len(CASES) >= 100


@pytest.mark.parametrize("overrides,needle,setup", CASES)
def test_bad_input_is_one_line(overrides, needle, setup, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    started = []
    monkeypatch.setattr(cli, "launch_local", lambda *a, **k: started.append(a) or 0)
    if setup is not None:
        setup(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in overrides]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path}/run")
    if any("/ro/" in a for a in args) and os.geteuid() == 0:
        pytest.skip("root can write into a read-only directory")
    before = _tree(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert not started, f"passed validation and would start workers: {args}"
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("thinwire-train: error:"), err
    assert needle.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before, "the run dir (or a file next to it) changed"
    assert elapsed < 5, f"took {elapsed:.1f} s"
