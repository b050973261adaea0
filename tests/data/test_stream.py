"""Streamed hf pretraining: reproducible, exact resume by replay, processes share the stream without overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_runs import TINY, final_weights, tiny_config

import mpp.train.pretrain as pretrain
from mpp.config import ConfigError, PretrainConfig, build_config
from mpp.data.stream import StreamPretrainSamples, open_stream, stream_length
from mpp.data.transforms import pretrain_transform


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """48 small JPEG/PNG cells with ClassLabel labels, saved with save_to_disk (streamed in 48 shards)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)) for _ in range(48)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(48)]}, features=features)
    out = tmp_path_factory.mktemp("hf") / "saved"
    ds.save_to_disk(str(out))
    return out


STREAM = ["data.source=hf", "data.streaming=true", "data.num_workers=0", "model.in_chans=3", "model.img_size=16",
          "optim.batch_size=8", "monitor.samples=16"]  # fmt: skip


def _same(ours: list, theirs: list) -> bool:
    return len(ours) == len(theirs) and all(
        torch.equal(x, y) for f, g in zip(ours, theirs, strict=True) for x, y in zip(f, g, strict=True)
    )


def _samples(path: Path, seed: int = 3) -> StreamPretrainSamples:
    stream, known = open_stream(str(path), "train", "image")
    tf = pretrain_transform(16, [0.5] * 3, [0.25] * 3, scale=(0.3, 1.0))
    length = stream_length(stream, known, "train", None, str(path))
    return StreamPretrainSamples(stream, length, tf, 3, "image", "label", (4, 4), 0.75, "random", seed,
                                 shuffle_buffer=16, threads=2)  # fmt: skip


def test_epochs_are_reproducible_reshuffled_and_resume_by_replay(saved):
    a, b = _samples(saved), _samples(saved)
    assert len(a) == 48
    first = list(a.epoch_batches(8, 0))
    assert len(first) == 6 and _same(first, list(b.epoch_batches(8, 0)))
    assert sorted(torch.cat([lab for _, _, lab in first]).tolist()) == sorted(i % 3 for i in range(48))
    second = list(a.epoch_batches(8, 1))
    assert not _same(first, second)  # the epoch reshuffles and re-augments
    resumed = list(b.epoch_batches(8, 1, skip_batches=4))
    assert len(resumed) == 2 and _same(second[4:], resumed)


def test_processes_share_the_stream_without_overlap(saved):
    seen = []
    for rank in (0, 1):
        batches = list(_samples(saved).epoch_batches(4, 0, rank=rank, world_size=2))
        assert len(batches) == 6  # 48 // 2 // 4
        seen.append({tuple(img.flatten()[:6].tolist()) for b in batches for img in b[0]})
    assert not seen[0] & seen[1]


def test_stream_pretraining_resumes_exactly(saved, tmp_path):
    common = [*STREAM, f"data.path={saved}", "optim.epochs=2"]
    straight = pretrain.run(tiny_config(tmp_path / "straight", *common))
    pretrain.run(tiny_config(tmp_path / "resumed", *common, "stop_at_step=9"))
    resumed = pretrain.run(tiny_config(tmp_path / "resumed", *common))
    a, b = final_weights(straight), final_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    monitor = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if "monitor" in line]
    assert monitor and "knn_avg" in monitor[-1]  # the monitor ran on the stream's first images


@pytest.mark.parametrize(("override", "message"), [
    ("data.source=synthetic", "data.streaming"), ("data.limit=8", "data.limit"), ("data.in_memory=true", "in_memory"),
])  # fmt: skip
def test_streaming_settings_that_cannot_work_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PretrainConfig, None, [*TINY, *STREAM, "data.path=x", override])


@pytest.mark.slow
def test_two_processes_stream(saved, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           "-m", "mpp", "pretrain", *TINY, *STREAM, f"data.path={saved}", "optim.batch_size=4",
           f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]  # fmt: skip
    assert steps[-1] == 2 * (48 // 2 // 4)  # 2 epochs of 6 steps, both processes in step
