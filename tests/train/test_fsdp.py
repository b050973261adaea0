"""FSDP pretraining on the CPU with 2 processes: it follows the plain run and resumes from its sharded checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_runs import TINY, final_weights, tiny_config
from safetensors.torch import load_file

import mpp.train.pretrain as pretrain

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = [*TINY, "optim.epochs=2", "optim.batch_size=4", "model.drop_path_rate=0.0", "monitor.samples=32"]


def launch(out: Path, *extra: str, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "mpp", "pretrain", *COMMON, f"output_dir={out}", *extra]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_fsdp_tracks_one_process_through_a_stop_and_resume(tmp_path):
    """2 sharded processes x batch 4, stopped mid-run and resumed, end where 1 plain process x batch 8 ends."""
    single = pretrain.run(tiny_config(tmp_path / "one", *COMMON[len(TINY) :], "optim.batch_size=8"))
    stopped = launch(tmp_path / "fsdp", "fsdp=true", "stop_at_step=5", port=29531)
    assert "sharded over 2 processes" in stopped.stdout
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").glob("step_00000005/sharded/*"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file of shards per process
    resumed = launch(tmp_path / "fsdp", "fsdp=true", port=29532)
    assert "step_00000005 at step 5" in resumed.stdout  # continued from the shards, not started over
    one, two = losses(single), losses(tmp_path / "fsdp")
    assert len(one) == len(two) == 16
    assert max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True)) < 1e-4
    # The exported weights are gathered from the shards: the whole MAE, equal to the one-process run's.
    a, b = final_weights(single), load_file(tmp_path / "fsdp" / "mae.safetensors")
    assert a.keys() <= b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert (tmp_path / "fsdp" / "recon" / "final.png").is_file()
    assert any('"stage": "monitor"' in line for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines())


def test_incomplete_sharded_checkpoint_is_skipped_with_its_reason(tmp_path):
    from mpp.train.checkpoint import CheckpointError, newest_resumable

    step = tmp_path / "checkpoints" / "step_00000003"
    (step / "sharded").mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch_in_epoch": 3}))
    with pytest.raises(CheckpointError, match=r"sharded/\.metadata is missing"):
        newest_resumable(tmp_path)
    (step / "sharded" / ".metadata").write_bytes(b"")
    found = newest_resumable(tmp_path)
    assert found is not None and found.sharded == step / "sharded" and found.trainer_state["step"] == 3
