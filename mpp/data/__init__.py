"""Data sources behind one interface, and the MAE transforms.

Every dataset from :func:`build_dataset` yields ``(transform(image), label)`` with ``label = -1`` when unlabeled and
has ``classes`` (names or ``None``) and ``targets`` (all labels, read without decoding images); see
:class:`~mpp.data.base.ImageDataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpp.data import synthetic
from mpp.data.base import ImageDataset
from mpp.data.fashion_mnist import MEAN as FASHION_MNIST_MEAN
from mpp.data.fashion_mnist import STD as FASHION_MNIST_STD
from mpp.data.fashion_mnist import FashionMNIST
from mpp.data.folder import ImageFolder
from mpp.data.hf import HFImageDataset
from mpp.data.images import ChannelMismatchError
from mpp.data.shards import TarShards
from mpp.data.synthetic import SyntheticShapes
from mpp.data.transforms import eval_transform, pretrain_transform

SOURCES = ("fashion-mnist", "folder", "shards", "hf", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "ChannelMismatchError",
    "FashionMNIST",
    "HFImageDataset",
    "ImageDataset",
    "ImageFolder",
    "SyntheticShapes",
    "TarShards",
    "build_dataset",
    "default_stats",
    "eval_transform",
    "pretrain_transform",
]


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid: {', '.join(repr(s) for s in SOURCES)}")


def _check_in_chans(in_chans: int) -> None:
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")


def default_stats(source: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation ``(mean, std)`` per channel, in ``[0, 1]`` pixel units, for a source.

    - ``fashion-mnist``: its training-set statistics, repeated for 3 channels.
    - ``synthetic``: the generator's measured statistics, the same for every channel.
    - ``folder``, ``shards`` and ``hf``: ImageNet's RGB statistics (what MAE and most pretrained ViTs use) for the
      first three channels of a 3+ channel model; every channel without an RGB counterpart (a grey model, a 2-channel
      model, or bands past the third of multispectral data) gets the mean of the three. For data far from photographs
      (multispectral, X-ray, microscopy) statistics measured on the data itself are better.

    Raises:
        ValueError: unknown source or non-positive ``in_chans``.
    """
    _check_source(source)
    _check_in_chans(in_chans)
    if source == "fashion-mnist":
        return FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    if source == "synthetic":
        return (synthetic.MEAN,) * in_chans, (synthetic.STD,) * in_chans
    grey_mean, grey_std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    if in_chans < 3:
        return (grey_mean,) * in_chans, (grey_std,) * in_chans
    return IMAGENET_MEAN + (grey_mean,) * (in_chans - 3), IMAGENET_STD + (grey_std,) * (in_chans - 3)


def build_dataset(
    source: str,
    split: str,
    transform: Callable[[Any], Any] | None,
    *,
    path: str | None = None,
    in_chans: int = 1,
    image_column: str = "image",
    label_column: str | None = "label",
    cache_dir: str | None = None,
    synthetic_size: int = 512,
    synthetic_img_size: int = 28,
    synthetic_classes: int = 4,
    seed: int = 0,
) -> ImageDataset:
    """Build the dataset of one split of a source.

    Args:
        source: ``"fashion-mnist"``, ``"folder"`` (a directory of images, see :class:`ImageFolder`), ``"shards"``
            (tar shards written by ``mpp shard``, see :class:`TarShards`), ``"hf"`` (a Hugging Face dataset, see
            :class:`HFImageDataset`) or ``"synthetic"`` (see :class:`SyntheticShapes`).
        split: ``"train"``/``"test"`` for Fashion-MNIST; ``"train"``/``"val"``/``"test"`` for synthetic; for a
            folder the sub-folder ``path/<split>`` when it exists; for hf the split name.
        transform: applied to each image (PIL for 1 or 3 channels, ``uint8 [C, H, W]`` otherwise); ``None`` yields
            ``uint8 [C, H, W]`` tensors.
        path: the folder, or the hf dataset (``save_to_disk`` directory, local data files, or Hub name).
        in_chans: channels the model takes; images are converted to it.
        image_column: hf column with the images.
        label_column: hf column with the labels; ``None`` or a missing column means unlabeled.
        cache_dir: download cache for Fashion-MNIST and hf.
        synthetic_size: images per synthetic split.
        synthetic_img_size: side of synthetic images.
        synthetic_classes: number of synthetic classes.
        seed: synthetic generator seed (each split derives its own).

    Returns:
        An :class:`ImageDataset` yielding ``(image, label)``, label ``-1`` when unlabeled.

    Raises:
        ValueError: unknown source, bad split, missing ``path``, or no usable image (naming the folder/column).
    """
    _check_source(source)
    _check_in_chans(in_chans)
    if source == "fashion-mnist":
        return FashionMNIST(split, transform, in_chans=in_chans, cache_dir=cache_dir)
    if source == "synthetic":
        return SyntheticShapes(
            split,
            transform,
            in_chans=in_chans,
            size=synthetic_size,
            img_size=synthetic_img_size,
            num_classes=synthetic_classes,
            seed=seed,
        )
    if not path:
        raise ValueError(f"data source {source!r} needs a path")
    if source == "folder":
        return ImageFolder(path, split, transform, in_chans=in_chans)
    if source == "shards":
        return TarShards(path, split, transform, in_chans=in_chans)
    return HFImageDataset(
        path,
        split,
        transform,
        in_chans=in_chans,
        image_column=image_column,
        label_column=label_column,
        cache_dir=cache_dir,
    )
