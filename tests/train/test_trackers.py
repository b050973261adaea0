"""trackers=...: real MLflow (local file store) and W&B (offline) runs get the loss and the pictures."""

import pytest

from mpp.config import ConfigError, PretrainConfig, build_config
from mpp.train import pretrain
from tests.pretrain_runs import TINY


def test_pretraining_logs_loss_and_pictures_to_mlflow_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = [*TINY, "optim.epochs=1", "monitor.enabled=false", "trackers=tensorboard,mlflow,wandb", f"output_dir={run}"]
    assert pretrain.main(args) == 0
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # MLflow's file store: mlruns/<experiment>/<run>/metrics/<key> and artifacts/
    losses = list((run / "mlruns").glob("*/*/metrics/pretrain/loss"))
    assert len(losses) == 1 and len(losses[0].read_text().splitlines()) >= 1
    assert list(losses[0].parents[2].glob("artifacts/pictures/pretrain/*.png"))
    # W&B offline: the run's records (history included) stay in RUN/wandb/offline-run-*/run-*.wandb until `wandb sync`
    (offline,) = (run / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    assert b"pretrain/loss" in records.read_bytes()
    assert list((offline / "files" / "media" / "images" / "pretrain").glob("reconstruction_*.png"))


def test_unknown_or_missing_tracker_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="trackers: unknown tracker 'tensorbored'"):
        build_config(PretrainConfig, None, [*TINY, "trackers=tensorbored"])
    assert build_config(PretrainConfig, None, [*TINY, "trackers=none"]).trackers == "none"
