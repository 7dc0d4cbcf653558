from __future__ import annotations

import pytest

from moe_lightning.loggers import NoLogger, WandbLogger


def test_wandb_logs_offline_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(dir=str(tmp_path))
    logger.start("test-run", {"policy": {"batch_size": 8}}, str(tmp_path))
    logger.log({"throughput_tok_s": 12.5, "trial": 0})
    logger.log_table("comparison", [{"system": "cgopipe", "tok_s": 12.5}])
    logger.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_no_logger_accepts_everything(tmp_path):
    logger = NoLogger()
    logger.start("x", {}, str(tmp_path))
    logger.log({"a": 1})
    logger.finish()
