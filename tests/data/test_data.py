"""Data sources and transforms, on tiny data made in tmp_path (plus the real Fashion-MNIST files)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mpp.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelMismatchError,
    build_dataset,
    default_stats,
    eval_transform,
    pretrain_transform,
)
from mpp.data.fashion_mnist import DEBIAN_DIR


def grey(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size), value, np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---- folder: labels ----------------------------------------------------------------------------------------------


def test_folder_labels_from_subfolders(tmp_path: Path) -> None:
    save(grey(10), tmp_path / "train" / "dog" / "b.png")
    save(grey(20), tmp_path / "train" / "cat" / "a.JPG")
    save(grey(30), tmp_path / "train" / "dog" / "nested" / "c.webp")
    save(grey(40), tmp_path / "train" / ".ipynb_checkpoints" / "x.png")  # hidden: never a class
    save(grey(50), tmp_path / "val" / "cat" / "v.png")
    ds = build_dataset("folder", "train", None, path=str(tmp_path), in_chans=3)
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0, 1, 1]
    assert len(ds) == 3 and ds.skipped == []
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 0
    val = build_dataset("folder", "val", None, path=str(tmp_path))
    assert val.targets == [0] and val.classes == ["cat"]


def test_flat_folder_is_unlabeled_for_any_split(tmp_path: Path) -> None:
    for i in range(3):
        save(grey(i), tmp_path / f"{i}.png")
    for split in ("train", "test"):
        ds = build_dataset("folder", split, None, path=str(tmp_path))
        assert ds.classes is None and ds.targets == [-1, -1, -1]
        assert [ds[i][1] for i in range(3)] == [-1, -1, -1]
        assert [int(ds[i][0][0, 0, 0]) for i in range(3)] == [0, 1, 2]  # sorted order


# ---- folder: channel conversion -----------------------------------------------------------------------------------


def _rgba() -> Image.Image:
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # red everywhere, but transparent on the left half
    a[:, 4:, 3] = 255
    return Image.fromarray(a, "RGBA")


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 1
    return img


MODES = {
    "L.png": lambda: grey(100),
    "RGB.jpg": lambda: Image.new("RGB", (8, 8), (200, 100, 50)),
    "RGBA.png": _rgba,
    "LA.png": lambda: Image.new("LA", (8, 8), (200, 255)),
    "P.png": lambda: Image.new("RGB", (8, 8), (0, 128, 255)).convert("P"),
    "Ptrans.png": _palette_with_transparency,
    "CMYK.jpg": lambda: Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
    "CMYK.tif": lambda: Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
    "1.bmp": lambda: Image.new("1", (8, 8), 1),
    "I16.png": lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)),
    "I16.tif": lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)),
    "F.tiff": lambda: Image.fromarray(np.full((8, 8), 0.5, np.float32)),
}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_folder_converts_every_mode(tmp_path: Path, in_chans: int) -> None:
    for name, make in MODES.items():
        save(make(), tmp_path / name)
    ds = build_dataset("folder", "train", None, path=str(tmp_path), in_chans=in_chans)
    assert len(ds) == len(MODES) and ds.skipped == []
    by_name = {Path(p).name: ds[i][0] for i, p in enumerate(ds.paths)}
    for name, image in by_name.items():
        assert image.shape == (in_chans, 8, 8) and image.dtype == torch.uint8, name
    for name in ("I16.png", "I16.tif", "F.tiff"):  # mid-grey stays mid-grey, not clipped to white
        assert 120 <= int(by_name[name].float().mean()) <= 135, name
    # Transparent pixels are composited onto black; opaque red stays red.
    rgba = by_name["RGBA.png"]
    assert int(rgba[:, :, :4].max()) == 0 and int(rgba[0, :, 4:].min()) > 50
    assert int(by_name["Ptrans.png"].max()) == 0


def test_multipage_tiff_gives_multispectral_channels(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((8, 8), 1000 * (k + 1), np.uint16)) for k in range(5)]
    save(pages[0], tmp_path / "a" / "bands.tif", save_all=True, append_images=pages[1:])
    save(grey(7), tmp_path / "a" / "photo.png")  # one channel: skipped for in_chans=5, not fatal
    ds = build_dataset("folder", "train", None, path=str(tmp_path), in_chans=5)
    assert len(ds) == 1 and len(ds.skipped) == 1 and "channels" in ds.report()
    image, _ = ds[0]
    assert image.shape == (5, 8, 8)
    assert image[:, 0, 0].tolist() == [round(1000 * (k + 1) / 257) for k in range(5)]


def test_folder_of_rgb_images_cannot_give_five_channels(tmp_path: Path) -> None:
    save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"need in_chans=5"):
        build_dataset("folder", "train", None, path=str(tmp_path), in_chans=5)
    assert issubclass(ChannelMismatchError, ValueError)


# ---- folder: broken files -----------------------------------------------------------------------------------------


def test_broken_files_are_skipped_counted_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(4):
        save(grey(60 * i), tmp_path / "cls" / f"{i}.png")
    truncated = truncated_jpeg(tmp_path / "cls" / "2b_truncated.jpg")
    fake = tmp_path / "cls" / "3b_fake.png"
    fake.write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="mpp.data"):
        ds = build_dataset("folder", "train", eval_transform(8, [0.5], [0.25]), path=str(tmp_path))
    # The fake is dropped at scan time, in the main process; the truncated file only fails when decoded. The scan
    # itself is quiet: a run reports its skips once (start_skip_log), however many views of the data it builds.
    assert len(ds) == 5 and ds.skipped == [str(fake)]
    from mpp.data.skips import start_skip_log

    note = start_skip_log(ds, tmp_path)
    assert "skipped 1 of 6 files" in note and str(fake) in (tmp_path / "skipped_files.txt").read_text()
    images, labels = [], []
    for x, y in DataLoader(ds, batch_size=2, num_workers=0):
        images.append(x)
        labels.append(y)
    assert torch.cat(images).shape == (5, 1, 8, 8) and torch.cat(labels).tolist() == [0] * 5
    assert ds.skipped == [str(fake), str(truncated)]
    report = ds.report()
    assert "2 skipped" in report and str(truncated) in report and "truncated" in report
    assert str(truncated) in caplog.text


def test_dataloader_workers_survive_broken_files(tmp_path: Path) -> None:
    for i in range(3):
        save(grey(i), tmp_path / f"{i}.png")
    truncated_jpeg(tmp_path / "1b.jpg")
    ds = build_dataset("folder", "train", eval_transform(8, [0.5], [0.25]), path=str(tmp_path))
    batches = list(DataLoader(ds, batch_size=4, num_workers=1))
    assert sum(len(x) for x, _ in batches) == 4


def test_empty_or_broken_folder_raises_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        build_dataset("folder", "train", None, path=str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken"):
        build_dataset("folder", "train", None, path=str(broken))
    truncated_only = tmp_path / "truncated_only"
    truncated_jpeg(truncated_only / "a.jpg")
    with pytest.raises(ValueError, match="truncated_only"):
        build_dataset("folder", "train", None, path=str(truncated_only))
    with pytest.raises(FileNotFoundError, match="missing"):
        build_dataset("folder", "train", None, path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs a path"):
        build_dataset("folder", "train", None)


# ---- hf -----------------------------------------------------------------------------------------------------------


def _hf_dir(tmp_path: Path) -> Path:
    kind = datasets.ClassLabel(names=["round", "square"])
    features = datasets.Features({"pixels": datasets.Image(), "kind": kind, "id": datasets.Value("int32")})
    images = [grey(10), Image.new("RGBA", (8, 8), (255, 0, 0, 255)), Image.fromarray(np.full((8, 8), 32768, np.uint16))]
    ds = datasets.Dataset.from_dict({"pixels": images, "kind": [1, 0, 1], "id": [0, 1, 2]}, features=features)
    out = tmp_path / "saved"
    ds.save_to_disk(str(out))
    return out


def test_hf_from_save_to_disk_with_custom_columns(tmp_path: Path) -> None:
    path = str(_hf_dir(tmp_path))
    ds = build_dataset("hf", "train", None, path=path, in_chans=3, image_column="pixels", label_column="kind")
    assert ds.classes == ["round", "square"] and ds.targets == [1, 0, 1]
    assert [tuple(ds[i][0].shape) for i in range(3)] == [(3, 8, 8)] * 3
    assert ds[1][0][:, 0, 0].tolist() == [255, 0, 0] and ds[1][1] == 0
    assert 120 <= int(ds[2][0].float().mean()) <= 135  # 16-bit scaled as in folders
    unlabeled = build_dataset("hf", "test", None, path=path, image_column="pixels")  # no "label" column
    assert unlabeled.classes is None and unlabeled.targets == [-1, -1, -1] and unlabeled[0][0].shape == (1, 8, 8)


def test_hf_missing_column_and_split(tmp_path: Path) -> None:
    path = str(_hf_dir(tmp_path))
    with pytest.raises(ValueError, match=r"no image column 'image'.*pixels"):
        build_dataset("hf", "train", None, path=path)
    saved = datasets.load_from_disk(path)
    dict_path = tmp_path / "dict"
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(dict_path))
    assert len(build_dataset("hf", "test", None, path=str(dict_path), image_column="pixels")) == 3
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'val'"):
        build_dataset("hf", "val", None, path=str(dict_path), image_column="pixels")


def test_hf_string_labels_and_broken_cell(tmp_path: Path) -> None:
    def png(value: int) -> bytes:
        path = save(grey(value), tmp_path / f"{value}.png")
        return path.read_bytes()

    cells = [png(1), b"definitely not an image", png(3)]
    ds = datasets.Dataset.from_dict({"img": cells, "label": ["b", "a", "b"]})
    ds.save_to_disk(str(tmp_path / "bytes"))
    data = build_dataset("hf", "train", None, path=str(tmp_path / "bytes"), image_column="img")
    assert data.classes == ["a", "b"] and data.targets == [1, 0, 1]
    items = [data[i] for i in range(3)]
    assert [int(x[0, 0, 0]) for x, _ in items] == [1, 3, 3] and [y for _, y in items] == [1, 1, 1]
    assert len(data.skipped) == 1 and "[1]" in data.skipped[0]


# ---- synthetic ----------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_with_requested_shapes() -> None:
    kwargs = {"synthetic_size": 64, "synthetic_img_size": 16, "synthetic_classes": 6, "seed": 3}
    a = build_dataset("synthetic", "train", None, in_chans=3, **kwargs)
    b = build_dataset("synthetic", "train", None, in_chans=3, **kwargs)
    test = build_dataset("synthetic", "test", None, in_chans=3, **kwargs)
    assert len(a) == 64 and len(a.classes) == 6 and sorted(set(a.targets)) == list(range(6))
    assert a.targets == b.targets and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, test.images)
    image, label = a[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == a.targets[0]
    assert build_dataset("synthetic", "val", None, in_chans=5, **kwargs)[0][0].shape == (5, 16, 16)


def test_synthetic_classes_are_separable() -> None:
    train = build_dataset("synthetic", "train", None)
    test = build_dataset("synthetic", "test", None)
    x, xt = train.images.flatten(1).float(), test.images.flatten(1).float()
    nearest = torch.cdist(xt, x).argmin(1)
    accuracy = (torch.tensor(train.targets)[nearest] == torch.tensor(test.targets)).float().mean()
    assert accuracy > 0.5  # chance is 0.25 for the default 4 classes


# ---- fashion-mnist ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="Fashion-MNIST files not installed")
def test_fashion_mnist() -> None:
    ds = build_dataset("fashion-mnist", "train", None)
    assert len(ds) == 60000 and len(ds.targets) == 60000 and len(ds.classes) == 10
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == ds.targets[0]
    mean, std = default_stats("fashion-mnist", 3)
    rgb = build_dataset("fashion-mnist", "test", eval_transform(28, mean, std), in_chans=3)
    assert len(rgb) == 10000 and rgb[0][0].shape == (3, 28, 28)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset("fashion-mnist", "val", None)


# ---- transforms and stats -----------------------------------------------------------------------------------------


def test_pretrain_transform_is_random_and_shaped() -> None:
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    t = pretrain_transform(16, IMAGENET_MEAN, IMAGENET_STD)
    a, b = t(img), t(img)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    tensor_out = pretrain_transform((16, 24), [0.5] * 5, [0.25] * 5)(torch.zeros(5, 40, 30, dtype=torch.uint8))
    assert tensor_out.shape == (5, 16, 24) and torch.allclose(tensor_out, torch.tensor(-2.0))


def test_eval_transform_is_deterministic() -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8))
    t = eval_transform(28, [0.5], [0.25])
    a, b = t(img), t(img)
    assert torch.equal(a, b)
    expected = (torch.from_numpy(np.array(img)).float() / 255 - 0.5) / 0.25
    assert torch.allclose(a[0], expected, atol=1e-5)  # no resize or crop at the native size
    wide = Image.new("RGB", (48, 32))
    assert eval_transform(32, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875)(wide).shape == (3, 32, 32)
    assert eval_transform(16, IMAGENET_MEAN, IMAGENET_STD)(wide).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(16, [0.5], [0.5], crop_pct=1.5)


def test_default_stats_and_unknown_source() -> None:
    assert default_stats("fashion-mnist", 1) == ((0.2860,), (0.3530,))
    assert default_stats("folder", 3) == (IMAGENET_MEAN, IMAGENET_STD)
    (grey_mean,), (grey_std,) = default_stats("hf", 1)
    assert grey_mean == pytest.approx(0.449) and grey_std == pytest.approx(0.226)
    mean, std = default_stats("folder", 5)
    assert mean[:3] == IMAGENET_MEAN and mean[3:] == (grey_mean, grey_mean) and len(std) == 5
    assert len(default_stats("synthetic", 4)[0]) == 4
    with pytest.raises(ValueError, match=r"unknown data source 'imagenet'; valid: 'fashion-mnist', 'folder'"):
        build_dataset("imagenet", "train", None)
    with pytest.raises(ValueError, match="unknown data source"):
        default_stats("nope", 1)
