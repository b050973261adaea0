"""Real Fashion-MNIST: read from Debian's ``dataset-fashion-mnist`` files, else downloaded by torchvision."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mpp.data.base import ImageDataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)  # training-set pixel statistics in [0, 1]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; the header gives dtype code and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.gz", root / name, root / "FashionMNIST" / "raw" / name):
        if candidate.exists():
            return candidate
    return None


def load_fashion_mnist(split: str, cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of a split (``"train"`` 60k or ``"test"`` 10k).

    Looks in Debian's directory first, then ``cache_dir`` (default ``~/.cache/mpp``), and downloads there with
    torchvision only when neither has the files.
    """
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir or os.environ.get("MPP_CACHE", Path.home() / ".cache" / "mpp"))
    image_name, label_name = _FILES[split]
    for root in (DEBIAN_DIR, cache):
        images, labels = _find(root, image_name), _find(root, label_name)
        if images and labels:
            return torch.from_numpy(read_idx(images).copy()), torch.from_numpy(read_idx(labels).astype(np.int64))
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(str(cache), train=split == "train", download=True)
    return ds.data.clone(), ds.targets.clone()


class FashionMNIST(ImageDataset):
    """Fashion-MNIST as an mpp dataset: 28x28 grey images (repeated to RGB for ``in_chans=3``), 10 classes.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
        transform: applied to each PIL image.
        in_chans: 1, or 3 to repeat the grey channel.
        cache_dir: where to look for / download the files (see :func:`load_fashion_mnist`).
    """

    def __init__(
        self,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        in_chans: int = 1,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(transform, in_chans)
        if in_chans not in (1, 3):
            raise ValueError(f"Fashion-MNIST is grey: in_chans must be 1 or 3, got {in_chans}")
        self.name = f"fashion-mnist {split}"
        self.images, labels = load_fashion_mnist(split, cache_dir)
        self.targets = labels.tolist()
        self.classes = list(CLASSES)

    def load(self, index: int) -> Image.Image:
        """Item ``index`` as a PIL ``'L'`` or ``'RGB'`` image."""
        img = Image.fromarray(self.images[index].numpy())
        return img if self.in_chans == 1 else img.convert("RGB")
