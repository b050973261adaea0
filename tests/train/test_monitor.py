"""The online kNN monitor: right features, right split, logged at the start and every epoch, survives resume."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mpp.data.pretraining as pretraining
import mpp.train.pretrain as pretrain
from mpp.config import ConfigError, PretrainConfig, build_config
from mpp.models import ViTClassifier, create_model
from mpp.train.monitor import BELOW_RANDOM_NOTE, KnnMonitor, MonitorReading, MonitorRun, pooled_features

TINY = [
    "model.name=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3", "mixed_precision=fp32",
    "progress=false", "log_every=1", "viz_samples=4", "monitor.samples=40",
]  # fmt: skip


def monitor_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "monitor"]


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_pooled_features_are_the_evaluation_features(pool):
    torch.manual_seed(0)
    encoder = create_model("mae_vit_micro_patch4").eval()
    imgs = torch.randn(3, 1, 28, 28)
    expected = ViTClassifier(copy.deepcopy(encoder), 10, pool).eval().forward_features(imgs)
    torch.testing.assert_close(pooled_features(encoder, imgs)[pool], expected)


def test_reading_classifies_separable_images_and_restores_train_mode():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat(25)
    images = labels.view(-1, 1, 1, 1).float().expand(-1, 1, 28, 28) + 0.01 * torch.randn(100, 1, 28, 28)
    monitor = KnnMonitor(images, labels, num_queries=20, k=5)
    encoder = create_model("mae_vit_micro_patch4").train()
    reading = monitor.measure(encoder)
    assert reading.top1 == {"avg": 100.0, "token": 100.0}
    assert encoder.training and monitor.bank_size == 80


def test_a_reading_below_random_init_is_explained_once():
    readings = iter(
        [
            {"avg": 60.0, "token": 55.0},
            {"avg": 58.0, "token": 56.0},
            {"avg": 40.0, "token": 50.0},
            {"avg": 30.0, "token": 45.0},
        ]
    )
    stub = SimpleNamespace(measure=lambda *_: MonitorReading(next(readings), 1.0))
    run, said = MonitorRun(stub, 1, 4, "avg"), []  # type: ignore[arg-type]
    host = SimpleNamespace(device="cpu", autocast=None)
    for step in range(4):
        run.read(None, host, step, step, SimpleNamespace(write=lambda *_: None), said.append)
    assert said.count(BELOW_RANDOM_NOTE) == 1
    assert said.index(BELOW_RANDOM_NOTE) == 3  # after step 2's reading: step 1 had one pooling above random


def test_unlabelled_data_gives_no_monitor():
    class Unlabelled(torch.utils.data.Dataset):
        targets = [-1] * 10

        def __getitem__(self, i):
            return torch.zeros(1, 28, 28), -1

    assert KnnMonitor.from_dataset(Unlabelled(), 10, 0.2, seed=0) is None


def test_monitor_never_reads_the_test_split_and_logs_every_epoch(tmp_path, monkeypatch):
    splits = []
    real = pretraining.build_dataset

    def recording(source, split, *args, **kwargs):
        splits.append(split)
        return real(source, split, *args, **kwargs)

    monkeypatch.setattr(pretraining, "build_dataset", recording)
    run_dir = pretrain.run(build_config(PretrainConfig, None, [*TINY, f"output_dir={tmp_path / 'run'}"]))
    assert splits and set(splits) == {"train"}
    records = monitor_records(run_dir)
    assert [r["step"] for r in records] == [0, 8, 16]  # random init, then after each of the 2 epochs
    first = records[0]
    assert first["knn_token"] == first["knn_token_random"] and first["knn_avg"] == first["knn_avg_random"]
    for r in records:
        assert 0.0 <= r["knn_token"] <= 100.0 and 0.0 <= r["knn_avg"] <= 100.0
        assert r["knn_token_random"] == first["knn_token"] and r["monitor_s"] >= 0


def test_resumed_run_keeps_the_random_reference(tmp_path):
    out = tmp_path / "run"
    pretrain.run(build_config(PretrainConfig, None, [*TINY, f"output_dir={out}", "stop_at_step=5"]))
    pretrain.run(build_config(PretrainConfig, None, [*TINY, f"output_dir={out}"]))
    records = monitor_records(out)
    assert [r["step"] for r in records] == [0, 8, 16]  # no second random-init reading after the resume
    assert {r["knn_avg_random"] for r in records} == {records[0]["knn_avg"]}


def test_monitor_off_and_every_epochs(tmp_path):
    off = pretrain.run(build_config(PretrainConfig, None, [*TINY, f"output_dir={tmp_path / 'off'}",
                                                           "monitor.enabled=false"]))  # fmt: skip
    assert monitor_records(off) == []
    sparse = pretrain.run(build_config(PretrainConfig, None, [*TINY, f"output_dir={tmp_path / 's'}", "optim.epochs=3",
                                                              "monitor.every_epochs=2"]))  # fmt: skip
    assert [r["step"] for r in monitor_records(sparse)] == [0, 16, 24]  # every 2nd epoch, and the last one


@pytest.mark.parametrize(
    "override,message",
    [("monitor.every_epochs=0", "monitor.every_epochs=0"), ("monitor.query_fraction=1.0", "monitor.query_fraction")],
)
def test_bad_monitor_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PretrainConfig, None, [*TINY, override])


@pytest.mark.parametrize("pool", ["token", "avg", "tokens"])
def test_feature_blocks_concatenate_the_last_blocks(pool):
    torch.manual_seed(0)
    encoder = create_model("mae_vit_micro_patch4").eval()
    imgs = torch.randn(3, 1, 28, 28)
    one = ViTClassifier(copy.deepcopy(encoder), 10, pool).eval()
    two = ViTClassifier(copy.deepcopy(encoder), 10, pool, feature_blocks=2).eval()
    width = encoder.embed_dim * (encoder.num_patches if pool == "tokens" else 1)  # tokens: the whole map, flattened
    both = two.forward_features(imgs)
    assert both.shape == (3, 2 * width) and two.head.in_features == 2 * width
    torch.testing.assert_close(both[:, width:], one.forward_features(imgs))  # the last block's part
    if pool == "tokens":  # every patch token after the final norm, in grid order, cls left out
        torch.testing.assert_close(one.forward_features(imgs), encoder.forward_features(imgs)[:, 1:].flatten(1))
    with pytest.raises(ValueError, match="feature_blocks must be in"):
        ViTClassifier(copy.deepcopy(encoder), 10, pool, feature_blocks=3)
