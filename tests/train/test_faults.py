"""Fault injection: crashes, broken files, full disks and odd paths end in one clear line or a recovery, never in a
traceback or a lost checkpoint."""

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import mpp.train.checkpoint as ckpt
import mpp.train.pretrain as pretrain
from mpp.config import PretrainConfig, build_config
from mpp.train.checkpoint import checkpoint_dirs, newest_resumable, read_checkpoint, save_checkpoint

TINY = [
    "model.name=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3", "mixed_precision=fp32",
    "progress=false", "log_every=1", "viz_samples=2", "monitor.enabled=false",
]  # fmt: skip


def tiny(out: Path, *extra: str) -> PretrainConfig:
    return build_config(PretrainConfig, None, [*TINY, f"output_dir={out}", *extra])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoint_dirs(run_dir)[-1]).model_state


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights of an uninterrupted tiny run, the reference every recovered run must match bit for bit."""
    out = tmp_path_factory.mktemp("full") / "run"
    pretrain.run(tiny(out))
    return weights(out)


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    state = {"w": torch.full((3,), float(step))}
    return save_checkpoint(run_dir, step, state, {"optimizer": {"state": {}, "param_groups": []}},
                           {"step": step, "epoch": 0, "batch_in_epoch": step}, keep=5)  # fmt: skip


# ------------------------------------------------------------------------------------------------ checkpoint files
def test_a_step_saved_twice_never_deletes_its_only_copy(tmp_path, monkeypatch):
    first = fake_checkpoint(tmp_path, 8)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill while the second copy is being written

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        fake_checkpoint(tmp_path, 8)
    monkeypatch.undo()
    assert newest_resumable(tmp_path).path == first  # the first copy is whole and is what resumes
    second = fake_checkpoint(tmp_path, 8)
    assert second.name == "step_00000008.1" and first.is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == second.name
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _evil_pickle(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path.write_bytes(pickle.dumps({"optimizer": Evil()}))


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", _truncate, "truncated or corrupt"),
    "empty weights": ("model.safetensors", lambda p: p.write_bytes(b""), "truncated or corrupt"),
    "empty optimizer": ("optimizer.pt", lambda p: p.write_bytes(b""), "truncated or corrupt"),
    "garbage optimizer": ("optimizer.pt", lambda p: p.write_text("not a torch file"), "optimizer.pt"),
    "code in optimizer": ("optimizer.pt", _evil_pickle, "would run code on load; refused"),
    "bad state": ("state.json", lambda p: p.write_text("{oops"), "truncated or corrupt"),
    "missing state": ("state.json", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_resume_falls_back_past_a_broken_newest_checkpoint(tmp_path, case):
    good = fake_checkpoint(tmp_path, 4)
    bad = fake_checkpoint(tmp_path, 6)
    name, damage, why = CORRUPTIONS[case]
    damage(bad / name)
    found = newest_resumable(tmp_path)
    assert found.path == good and torch.equal(found.model_state["w"], torch.full((3,), 4.0))
    assert [s[0] for s in found.skipped] == [bad.name] and why in found.skipped[0][1] and name in found.skipped[0][1]


def test_garbage_or_dangling_latest_does_not_stop_a_resume(tmp_path):
    good = fake_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\x00\xff garbage")
    assert newest_resumable(tmp_path).path == good
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert newest_resumable(tmp_path).path == good


def test_no_loadable_checkpoint_is_one_line_naming_each(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.run(tiny(out, "stop_at_step=2"))
    for path in checkpoint_dirs(out):
        (path / "model.safetensors").write_bytes(b"")
    assert pretrain.main([*TINY, f"output_dir={out}"]) == 2
    err = one_line_error(capsys)
    assert "no checkpoint in" in err and "model.safetensors" in err and "move that folder away" in err


# ------------------------------------------------------------------------------------------------ whole runs
def test_broken_newest_checkpoint_resumes_from_the_previous_one_bit_identically(tmp_path, full_run, capsys):
    out = tmp_path / "run"
    pretrain.run(tiny(out, "stop_at_step=6", "checkpoint_every_steps=2", "keep_checkpoints=3"))
    newest = checkpoint_dirs(out)[-1]
    assert newest.name == "step_00000006"
    _truncate(newest / "model.safetensors")
    capsys.readouterr()
    pretrain.run(tiny(out, "checkpoint_every_steps=2", "keep_checkpoints=3"))
    printed = capsys.readouterr().out
    assert "skipped checkpoint step_00000006" in printed and "resumed from" in printed and "step 4" in printed
    assert same(weights(out), full_run)


@pytest.mark.parametrize("spelling", ["moved", "relative", "trailing_slash"])
def test_resume_accepts_a_moved_or_differently_spelled_run_dir(tmp_path, full_run, monkeypatch, spelling):
    out = tmp_path / "run"
    pretrain.run(tiny(out, "stop_at_step=5"))
    if spelling == "moved":
        target = str(tmp_path / "elsewhere" / "copy")
        shutil.copytree(out, target)
        shutil.rmtree(out)
    else:
        monkeypatch.chdir(tmp_path)
        target = "run/" if spelling == "trailing_slash" else "run"
    assert pretrain.main(["--resume", target, "stop_at_step=null"]) == 0
    assert same(weights(Path(target)), full_run)


def test_kill_during_checkpoint_writes_then_resume(tmp_path, full_run, monkeypatch):
    out = tmp_path / "run"
    pretrain.run(tiny(out, "stop_at_step=4", "checkpoint_every_steps=2"))
    calls = {"n": 0}
    real_save = ckpt.save_file

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint of the resumed run: weights half written, then the kill
            Path(args[1]).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny(out, "checkpoint_every_steps=2"))
    monkeypatch.undo()
    assert checkpoint_dirs(out)[-1].name == "step_00000006"  # the partial step-8 checkpoint never became visible
    pretrain.run(tiny(out, "checkpoint_every_steps=2"))
    assert same(weights(out), full_run)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, full_run):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpp", "pretrain", *TINY, f"output_dir={out}", "checkpoint_every_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the in-process runs use 2 threads (conftest): same arithmetic
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Wait for the step-3 checkpoint by name: only two are kept, so counting directories would race with pruning.
    while (
        time.time() < deadline
        and proc.poll() is None
        and not any(p.name >= "step_00000003" for p in checkpoint_dirs(out))
    ):
        time.sleep(0.01)
    time.sleep(0.02)  # somewhere in the run, maybe mid-checkpoint
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pretrain.main(["--resume", str(out)]) == 0
    assert same(weights(out), full_run)


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = ckpt.save_file
    calls = {"n": 0}

    def fills_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fills_disk)
    assert pretrain.main([*TINY, f"output_dir={out}", "checkpoint_every_steps=2"]) == 2
    err = one_line_error(capsys)
    assert "no space left while writing checkpoint" in err and "step_00000004" in err
    assert "the previous checkpoint step_00000002 is intact" in err
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000002"]
    read_checkpoint(checkpoint_dirs(out)[0])


@pytest.mark.parametrize("where", ["is_file", "below_file", "read_only"])
def test_unusable_output_dir_is_one_line(tmp_path, monkeypatch, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if where == "is_file" else blocker / "run"
    if where == "read_only":
        out = tmp_path / "ro" / "run"
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if "ro" in self.parts:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    assert pretrain.main([*TINY, f"output_dir={out}"]) == 2
    err = one_line_error(capsys)
    assert f"output_dir {out}" in err
    assert {"is_file": "is a file", "below_file": "is below", "read_only": "Read-only"}[where] in err


# ------------------------------------------------------------------------------------------------ weight files
WEIGHT_FILES = {
    "empty.safetensors": (b"", "the file is empty"),
    "garbage.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a safetensors file"),
    "empty.pth": (b"", "the file is empty"),
    "text.pth": (b"these are not weights\n", "not a PyTorch weights file"),
}


@pytest.mark.parametrize("name", list(WEIGHT_FILES))
def test_broken_weight_files_are_one_line_for_convert_and_probe(tmp_path, capsys, name):
    from mpp.eval.probe import main as probe_main
    from mpp.formats.convert import main as convert_main

    content, why = WEIGHT_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    assert convert_main([str(path), str(tmp_path / "out")]) != 0
    err = one_line_error(capsys)
    assert str(path) in err and why in err
    assert probe_main([str(path), "data.source=synthetic", "mixed_precision=fp32"]) == 2
    err = one_line_error(capsys)
    assert str(path) in err and why in err


# ------------------------------------------------------------------------------------------------ image folders
def noisy_png(path: Path, cut: bool = False) -> None:
    """A 64x64 noise PNG; ``cut`` keeps its header but drops the end of its pixel data."""
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()).save(path)
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])


def test_messy_folder_lists_every_skipped_file_once(tmp_path, capsys):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 20), (i * 20, 40 if cls == "a" else 200, 90)).save(root / cls / f"{i}.png")
    (root / "a" / "text.jpg").write_text("not an image")
    (root / "b" / "empty.png").write_bytes(b"")
    noisy_png(root / "b" / "cut.png", cut=True)  # header fine, pixels cut off: fails on decode
    cfg = tiny(tmp_path / "run", "data.source=folder", f"data.path={root}", "model.in_chans=3", "model.img_size=16",
               "optim.epochs=1", "optim.batch_size=4")  # fmt: skip
    capsys.readouterr()
    pretrain.run(cfg)
    printed = capsys.readouterr()
    listing = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    rows = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in listing[1:]}
    assert {"text.jpg", "empty.png"} <= rows.keys() and rows["text.jpg"] == "scan"
    if "cut.png" in rows:  # found before training when among the first decoded, else while training
        assert rows["cut.png"] in ("scan", "decode")
    text = printed.out + printed.err
    assert (
        text.count("skipped_files.txt") >= 1
        and text.count("skipped 3 of 23 files") + text.count("skipped 2 of 23 files") == 1
    )


def test_truncated_image_found_while_training_is_listed_with_decode(tmp_path):
    from mpp.data.folder import ImageFolder
    from mpp.data.skips import decode_skips, start_skip_log

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(root / f"{i}.png")
    noisy_png(root / "5.png", cut=True)
    folder = ImageFolder(root, "train", in_chans=3)
    assert len(folder) == 6  # the first image decodes, so the scan keeps the cut one
    run = tmp_path / "run"
    run.mkdir()
    start_skip_log(folder, run)
    image, _ = folder[5]  # replaced by the next readable image
    assert image is not None
    assert [Path(p).name for p in decode_skips(run)] == ["5.png"]
