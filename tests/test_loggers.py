"""Loggers: wandb names derived from comm/sync/optim, the resolved config and metrics in an
offline run (read back from the .wandb file on disk, no network), the `wandb sync` line, and
``logger=none`` with presets that set ``logger.mode``."""
from __future__ import annotations

import glob
import json
import os
import re
import struct

from omegaconf import OmegaConf

from thinwire.config import compose
from thinwire.trainer.loggers import NullLogger, WandbLogger, wandb_names
from thinwire.config import validate

TOPK_CO2 = ["comm=topk", "comm.ratio=0.01", "comm.feedback=ef21", "sync=co2", "sync.local_steps=8",
            "optim=adamw", "optim.lr=1e-3"]


def test_tiny_preset_composes_with_logger_none():
    """experiment=tiny sets logger.mode; logger=none must still compose (it used to fail)."""
    cfg = compose(["experiment=tiny", "logger=none"])
    validate(cfg)
    assert cfg.logger._target_ == "thinwire.trainer.loggers.NullLogger"
    kwargs = OmegaConf.to_container(cfg.logger)
    kwargs.pop("_target_")
    NullLogger(**kwargs, run_dir="unused").log({"step": 1, "loss": 1.0}, step=1)


def test_mode_is_offline_unless_asked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose([]).logger.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose([]).logger.mode == "online"
    assert compose(["logger.mode=disabled"]).logger.mode == "disabled"  # the command line wins


def test_names_from_comm_sync_optim():
    # a dict written by hand (only the keys naming reads), not the composed config
    cfg = {"comm": {"name": "topk", "ratio": 0.01, "feedback": "ef21"},
           "sync": {"name": "co2", "local_steps": 8}, "optim": {"name": "adamw", "lr": 1e-3}}
    assert wandb_names(cfg) == {"group": "topk+ef21_co2_adamw", "name": "topk0.01+ef21_co2-H8_adamw-lr0.001",
                                "tags": ["comm:topk", "feedback:ef21", "sync:co2", "optim:adamw"]}
    dense = {"comm": {"name": "none", "ratio": 0.01, "feedback": "none"},
             "sync": {"name": "ddp", "local_steps": 1}, "optim": {"name": "sgd", "lr": 0.1}}
    assert wandb_names(dense) == {"group": "none_ddp_sgd", "name": "none_ddp_sgd-lr0.1",
                                  "tags": ["comm:none", "feedback:none", "sync:ddp", "optim:sgd"]}
    # int8 has no density: the ratio stays out of the name
    int8 = {**dense, "comm": {"name": "int8", "ratio": 0.5, "feedback": "ef"}}
    assert wandb_names(int8)["name"] == "int8+ef_ddp_sgd-lr0.1"


def wandb_records(path: str) -> list:
    """Decode a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, each payload a serialised wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_offline_run_has_derived_names_resolved_config_and_sync_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the explicit mode below must win over the environment
    cfg = compose([*TOPK_CO2, f"hydra.run.dir={tmp_path}/run"])
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    logger = WandbLogger(project="tw-test", mode="offline", tags=["mine"], run_dir=run_dir, run_config=run_config)
    logger.log({"step": 1, "loss": 4.25, "wire_bytes": 1000}, step=1)
    logger.log({"step": 2, "loss": 3.5, "wire_bytes": 900, "val_loss": 3.75}, step=2)
    logger.finish()

    line = [ln for ln in capsys.readouterr().out.splitlines() if "wandb sync" in ln]
    assert len(line) == 1
    sync_dir = re.search(r"wandb sync (\S+)$", line[0]).group(1)
    assert os.path.dirname(os.path.abspath(sync_dir)) == os.path.join(run_dir, "wandb")
    files = glob.glob(os.path.join(sync_dir, "*.wandb"))
    assert len(files) == 1

    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tw-test"
    assert run.display_name == "topk0.01+ef21_co2-H8_adamw-lr0.001"
    assert run.run_group == "topk+ef21_co2_adamw"
    assert list(run.tags) == ["mine", "comm:topk", "feedback:ef21", "sync:co2", "optim:adamw"]
    logged = {item.key: json.loads(item.value_json) for item in run.config.update}
    for group in ("comm", "sync", "optim", "model", "data", "trainer", "dist", "logger"):
        assert logged[group] == run_config[group], group
    assert logged["run_dir"] == run_dir and logged["comm"]["ratio"] == 0.01

    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert [(h["_step"], h["loss"], h["wire_bytes"]) for h in history] == [(1, 4.25, 1000), (2, 3.5, 900)]
    assert history[1]["val_loss"] == 3.75
