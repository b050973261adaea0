"""Data fingerprints: counts, sizes, channels and statistics measured; large splits sampled; a cache reused."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mpp.data.fingerprint import fingerprint_of, measure


def _folder(root, sizes=((32, 32),), colour=False, per_class=3):
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            value = 64 * (c + 1)  # class 0: 64, class 1: 128
            pixels = np.full((h, w, 3) if colour else (h, w), value, np.uint8)
            if colour:
                pixels[..., 2] = 0
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def _data(path):
    return SimpleNamespace(source="folder", path=str(path), split="train", image_column="image", label_column="label",
                           cache_dir=None, synthetic_size=0, synthetic_classes=0)  # fmt: skip


def test_fingerprint_measures_a_folder_and_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "grey", sizes=((32, 32), (40, 24)))
    fp, cached = fingerprint_of(_data(root))
    assert not cached and fp.count == fp.sampled == 6 and fp.channels == 1 and fp.classes == 2
    assert (fp.sizes_distinct, fp.side_min, fp.side_max) == (2, 24, 40) and fp.square_share == pytest.approx(4 / 6)
    # 4 images of 32x32 and 2 of 40x24 (960 px each); values 64 and 128, half the images each
    assert fp.stats(1)[0][0] == pytest.approx((64 + 128) / 2 / 255, abs=1e-3)
    assert fp.decoded_bytes == 4 * 1024 + 2 * 960
    again, cached = fingerprint_of(_data(root))
    assert cached and again == fp
    touched = root / "class0" / "0.png"
    os.utime(touched, ns=(1, 1))
    _, cached = fingerprint_of(_data(root))
    assert not cached  # a changed file is measured again

    colour = fingerprint_of(_data(_folder(tmp_path / "colour", colour=True)))[0]
    assert colour.channels == 3 and colour.stats(3)[0][2] == 0.0 and len(colour.stats(3)[0]) == 3


def test_a_large_split_is_sampled():
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    items = [(images[i], -1) for i in range(300)]

    class Split(list):
        targets = [-1] * 300

    fp = measure(Split(items), "synthetic", "train", sample=50)
    assert fp.count == 300 and fp.sampled == 50 and fp.classes == 0 and fp.labelled_share == 0.0
    assert fp.channels == 3 and fp.stats(3)[0][0] == pytest.approx(0.5, abs=0.05)
