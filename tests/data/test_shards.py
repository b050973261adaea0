"""Tar shards (``mpp shard``): the same images and labels as the folder they came from, no image file touched at
start, exact resume, and a 2-process run that matches one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import mpp.train.pretrain as pretrain
from mpp.cli import main as cli_main
from mpp.config import PretrainConfig, build_config
from mpp.data import build_dataset
from mpp.data.shards import TarShards
from mpp.train.checkpoint import checkpoint_dirs, read_checkpoint


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imgs = root / "imgs"
    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (imgs / cls).mkdir(parents=True)
        for i in range(16):
            pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(imgs / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (imgs / "dogs" / "notes.jpg").write_text("not an image")
    assert cli_main(["shard", str(imgs), str(root / "shards"), "--shard-size", "10"]) == 0
    return imgs, root / "shards"


def test_shards_hold_the_folders_images_labels_and_order(folder_and_shards):
    imgs, shards = folder_and_shards
    folder = build_dataset("folder", "train", None, path=str(imgs), in_chans=3)
    packed = build_dataset("shards", "train", None, path=str(shards), in_chans=3)
    assert len(packed) == len(folder) == 32 and packed.targets == folder.targets and packed.classes == ["cats", "dogs"]
    assert len(json.loads((shards / "index.json").read_text())["shards"]) == 4  # 32 images, 10 per shard
    for i in (0, 9, 10, 31):
        assert torch.equal(packed[i][0], folder[i][0])
    assert "notes.jpg" in (shards / "skipped_files.txt").read_text()


def test_opening_shards_reads_only_the_index(folder_and_shards, monkeypatch):
    _, shards = folder_and_shards
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    TarShards(shards, "train")
    assert opened == []


def test_missing_index_is_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no index.json .write shards with `mpp shard"):
        TarShards(tmp_path, "train")


TINY = [
    "model.name=mae_vit_micro_patch4", "model.in_chans=3", "model.img_size=16", "data.num_workers=0",
    "optim.batch_size=4", "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3", "mixed_precision=fp32",
    "progress=false", "viz_samples=2", "monitor.enabled=false", "model.drop_path_rate=0",
]  # fmt: skip


def test_pretraining_on_shards_resumes_exactly(folder_and_shards, tmp_path):
    _, shards = folder_and_shards
    source = ["data.source=shards", f"data.path={shards}"]
    full = tmp_path / "full"
    pretrain.run(build_config(PretrainConfig, None, [*TINY, *source, f"output_dir={full}"]))
    split = tmp_path / "split"
    pretrain.run(build_config(PretrainConfig, None, [*TINY, *source, f"output_dir={split}", "stop_at_step=5"]))
    pretrain.run(build_config(PretrainConfig, None, [*TINY, *source, f"output_dir={split}"]))
    a, b = (read_checkpoint(checkpoint_dirs(d)[-1]).model_state for d in (full, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_on_shards_track_one(folder_and_shards, tmp_path):
    _, shards = folder_and_shards
    common = [*TINY, "data.source=shards", f"data.path={shards}", "optim.epochs=1", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "mpp", "pretrain", *common, "optim.batch_size=8", f"output_dir={tmp_path / 'one'}"]
    one = subprocess.run(single, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29531", "-m", "mpp", "pretrain", *common, f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    two = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if r.get("stage") == "pretrain"] for d in ("one", "two")]  # fmt: skip
    assert len(losses[0]) == len(losses[1]) == 4
    assert max(abs(a - b) / abs(a) for a, b in zip(*losses, strict=True)) < 1e-4
