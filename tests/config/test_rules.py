"""The no-recipe rules: each rule's output for a few fingerprints, and the command line winning over them."""

import numpy as np
from PIL import Image

from mpp.config.rules import derive
from mpp.data.fingerprint import Fingerprint
from mpp.train import pretrain


def _fp(count: int, side: int, channels: int, classes: int = 10) -> Fingerprint:
    sampled, labelled, decoded = min(count, 2000), 1.0 if classes else 0.0, count * side * side * channels
    return Fingerprint(
        "folder", "train", count, sampled, channels, side, side, side, side, 1.0, 1, [0.3] * 3, [0.35] * 3, classes,
        labelled, decoded,
    )  # fmt: skip


def _rules(fp: Fingerprint, cuda: bool = False, **given: bool) -> dict:
    kwargs = {"minutes_given": None, "epochs_given": False, **given}
    return {c.key: c.value for c in derive(fp, cuda=cuda, cores=2, **kwargs)}


def test_rules_for_a_few_fingerprints():
    small = _rules(_fp(300, 32, 1))  # a small grey folder on the CPU
    assert small["model.name"] == "mae_vit_tiny_patch4" and small["model.in_chans"] == 1
    assert (small["model.img_size"], small["model.patch_size"]) == (32, 8)
    odd = _rules(_fp(300, 30, 1))  # 30 px: patch 7, the size rounded down to 28
    assert (odd["model.img_size"], odd["model.patch_size"]) == (28, 7)
    assert small["optim.batch_size"] == 16 and small["data.crop_scale_min"] == 1.0 and small["optim.minutes"] == 10
    assert small["optim.warmup_epochs"] == round(300 / (300 // 16), 3) and small["data.in_memory"] is True
    assert small["monitor.samples"] == 300 and small["data.mean"] == [0.3] and small["model.mask_ratio"] == 0.6

    mid = _rules(_fp(60_000, 96, 3, classes=0))  # 96 px colour, unlabeled, CPU: capped at 64 px
    assert (mid["model.img_size"], mid["model.patch_size"]) == (64, 16) and mid["optim.batch_size"] == 128
    assert "monitor.samples" not in mid and len(mid["data.mean"]) == 3

    big = _rules(_fp(1_000_000, 256, 3), cuda=True, epochs_given=True)  # ImageNet-like on a GPU
    assert big["model.name"] == "mae_vit_base_patch16" and (big["model.img_size"], big["model.patch_size"]) == (224, 16)
    assert big["optim.batch_size"] == 256 and big["data.crop_scale_min"] == 0.2 and "optim.minutes" not in big
    assert big["data.in_memory"] is False and big["data.num_workers"] == 1 and big["model.mask_ratio"] == 0.75


def test_no_recipe_command_prints_its_choices_and_the_command_line_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    for c in range(2):
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((28, 28), 50 + 100 * c, np.uint8)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    argv = ["--print-config", f"data.path={tmp_path / 'imgs'}", "optim.batch_size=8", "model.img_size=16"]
    code = pretrain.main(argv)
    out = capsys.readouterr().out
    assert code == 0 and "no recipe; settings from the data (80 images" in out
    assert "optim.batch_size     16" in out and "(given on the command line: kept)" in out
    config = out[out.index("model:") :]
    assert "source: folder" in config and "batch_size: 8" in config and "img_size: 16" in config
    assert "crop_scale_min: 1.0" in config and "minutes: 10" in config and "in_chans: 1" in config
