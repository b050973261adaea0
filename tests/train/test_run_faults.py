"""Faults that used to lose work: the only good checkpoint pruned, silent bit rot, two runs in one directory."""

import errno
from pathlib import Path

import pytest
import torch

from mpp.config import ConfigError
from mpp.runtime import DiskFullError, atomic_save_image
from mpp.train import pretrain
from mpp.train.checkpoint import REJECTED, checkpoint_dirs, newest_resumable, save_checkpoint
from mpp.train.lock import RunDirLock
from mpp.train.pretrain import check_same_world
from tests.pretrain_runs import TINY, tiny_config


def _save(run, step, keep):
    weights = {"w": torch.arange(4096, dtype=torch.float32) + step}
    return save_checkpoint(run, step, weights, {"optimizer": {"state": {}, "param_groups": []}},
                           {"step": step, "epoch": 0, "batch_in_epoch": step}, keep)  # fmt: skip


def test_pruning_keeps_the_checkpoint_a_resume_fell_back_to(tmp_path):
    _save(tmp_path, 100, keep=2)
    newest = _save(tmp_path, 200, keep=2)
    (newest / "model.safetensors").write_bytes(b"cut")  # the newest is broken: a resume continues from 100
    found = newest_resumable(tmp_path)
    assert found.trainer_state["step"] == 100 and found.skipped[0][0] == newest.name
    _save(tmp_path, 150, keep=1)  # the resumed run's next checkpoint, with keep_checkpoints=1
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000150"]
    assert (tmp_path / "checkpoints" / f"{REJECTED}{newest.name}").is_dir()  # set aside, not deleted
    assert newest_resumable(tmp_path).trainer_state["step"] == 150


def test_flipped_bytes_inside_tensor_data_are_caught_and_skipped(tmp_path):
    _save(tmp_path, 100, keep=2)
    newest = _save(tmp_path, 200, keep=2)
    part = newest / "model.safetensors"
    data = bytearray(part.read_bytes())
    for i in range(len(data) - 200, len(data) - 136):  # 64 bytes of float data: still a valid safetensors file
        data[i] ^= 0xFF
    part.write_bytes(bytes(data))
    found = newest_resumable(tmp_path)
    assert found.trainer_state["step"] == 100
    assert "model.safetensors does not match the checksum" in found.skipped[0][1]


def test_a_second_run_into_a_live_run_directory_stops_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    first = RunDirLock(run).acquire()  # a live run holds the directory
    code = pretrain.main([*TINY, f"output_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{run} is in use by another run" in err[0] and '"pid"' in err[0]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    first.release()
    (run / ".lock").write_text('{"pid": 999999, "host": "gone"}')  # left by a killed run: no one holds the lock
    notes = []
    with RunDirLock(run, say=notes.append):
        pass
    assert notes and "took over the lock of a run that is gone" in notes[0]


def test_an_evaluation_into_a_live_run_directory_stops_and_lets_go_when_done(tmp_path, capsys):
    from mpp.cli import main as cli_main

    run = tmp_path / "knn"
    run.mkdir()
    knn = ["knn", "init=random", "model=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=32",
           "data.num_workers=0", "progress=false", f"output_dir={run}"]  # fmt: skip
    first = RunDirLock(run).acquire()
    assert cli_main(knn) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another run" in err[0] and not (run / "results.json").exists()
    first.release()
    assert cli_main(knn) == 0 and (run / "results.json").exists()
    RunDirLock(run).acquire().release()  # the finished command let go of the directory


def test_resuming_on_another_process_count_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("_run:\n  world_size: 2\n")
    config = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"trained on 2 process\(es\) and is resumed on 1: the effective batch would "
                                          r"change from 16 to 8.*resume_any_world=true"):  # fmt: skip
        check_same_world(tmp_path, 1, config)
    check_same_world(tmp_path, 2, config)
    check_same_world(tmp_path, 1, tiny_config(tmp_path, "resume_any_world=true"))


@pytest.mark.parametrize("limit", [0, 100, 5000])
def test_a_full_disk_inside_the_optimizer_file_is_one_clear_error(tmp_path, monkeypatch, limit):
    _save(tmp_path, 100, keep=2)
    real = Path.write_bytes

    def full_after(self, data):
        if self.name == "optimizer.pt":
            real(self, bytes(data)[:limit])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_after)
    with pytest.raises(DiskFullError, match="no space left while writing checkpoint .*step_00000200; the previous "
                                            "checkpoint step_00000100 is intact"):  # fmt: skip
        _save(tmp_path, 200, keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_00000100"]


def test_a_full_disk_while_saving_a_picture_keeps_the_previous_one(tmp_path, monkeypatch):
    from PIL import Image

    picture = tmp_path / "recon" / "final.png"
    picture.parent.mkdir()
    atomic_save_image(Image.new("L", (8, 8), 255), picture)
    before = picture.read_bytes()

    def full_after_a_few_bytes(self, fp, format=None, **params):  # noqa: A002 (PIL's own argument name)
        Path(fp).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_after_a_few_bytes)
    with pytest.raises(DiskFullError, match=f"no space left while writing {picture}$"):
        atomic_save_image(Image.new("L", (8, 8), 0), picture)
    assert picture.read_bytes() == before and [p.name for p in picture.parent.iterdir()] == ["final.png"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["viz_samples=-1"], "viz_samples=-1"),
        (["checkpoint_every_steps=-1"], "checkpoint_every_steps=-1"),
        (["model.mask_ratio=0.99"], "model.mask_ratio=0.99: leaves no visible patch"),
        (["seed=100000000000000000000000"], "seed="),
        (["data.synthetic_classes=0"], "data.synthetic_classes=0"),
        (["data.mean=[0.1,0.2]", "data.std=[0.1,0.2]"], "data.mean/data.std have 2/2 values"),
        (["data.source=folder", "data.path=/nonexistent/images"], "/nonexistent/images"),
        (["--recipe", "BINARY"], "not a text (UTF-8) YAML recipe"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_key_and_leave_nothing(tmp_path, capsys, args, names):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe")
    args = [str(tmp_path / "binary.yaml") if a == "BINARY" else a for a in args]
    out = tmp_path / "run"
    assert pretrain.main([*TINY, *args, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and not out.exists()


def test_a_broken_saved_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(": : [")
    assert pretrain.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml: not a readable run config" in err[0]
