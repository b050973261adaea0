"""Image transforms of every stage: the MAE paper's pretraining and fine-tuning augmentations, an evaluation resize.

Fine-tuning is timm's RandomResizedCrop, flip, RandAugment and random erasing.

All return ``float32 [C, H, W]`` normalised with ``mean``/``std`` (one value per channel). Pretraining and evaluation
accept PIL images or ``uint8 [C, H, W]`` tensors (any channel count). timm's ``create_transform`` works on PIL images of
1 or 3 channels (Fashion-MNIST's grey 28x28 included); images of other channel counts (multispectral tensors) get the
fine-tuning crop, flip and erasing from torchvision instead, and no RandAugment, whose colour operations are defined for
grey and RGB only. In-memory pretraining augments whole batches instead (:func:`~mpp.data.memory.augment_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    return size


def _to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def pretrain_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
) -> v2.Compose:
    """The MAE pretraining augmentation: random resized crop, horizontal flip, to float, normalise.

    As in the paper: crops cover ``scale`` (default 20% to 100%) of the image area with aspect ratio 3/4 to 4/3,
    resized with bicubic interpolation (antialiased); no colour jitter.

    Args:
        img_size: output side, or ``(height, width)``.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation.
        scale: range of the crop's fraction of the image area.
        hflip: flip horizontally with probability 0.5 (turn off for data where left and right differ, e.g. text).

    Returns:
        A ``torchvision.transforms.v2`` pipeline.
    """
    crop = v2.RandomResizedCrop(_size(img_size), scale=scale, interpolation=BICUBIC, antialias=True)
    ops: list[v2.Transform] = [crop]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _to_normalised_float(mean, std))


def eval_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float | None = None,
) -> v2.Compose:
    """Deterministic evaluation transform: bicubic resize, center crop, to float, normalise.

    With ``crop_pct`` (0.875 is the usual ImageNet value) the shorter side is resized to ``int(img_size / crop_pct)``
    and the central ``img_size`` crop is kept, as in the MAE fine-tuning evaluation. With ``None`` the shorter side
    is resized straight to ``img_size`` and the center crop only trims a non-square image: what small images (28x28
    Fashion-MNIST) need, where cropping would cut off content.

    Args:
        img_size: output side, or ``(height, width)``.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation.
        crop_pct: fraction of the resized image kept by the center crop, in ``(0, 1]``, or ``None`` for 1.

    Returns:
        A ``torchvision.transforms.v2`` pipeline.
    """
    height, width = _size(img_size)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    pct = 1.0 if crop_pct is None else crop_pct
    # An int size resizes the shorter side and keeps the aspect ratio; a pair would stretch the image.
    resize = int(height / pct) if height == width else (int(height / pct), int(width / pct))
    ops: list[v2.Transform] = [
        v2.Resize(resize, interpolation=BICUBIC, antialias=True),
        v2.CenterCrop((height, width)),
    ]
    return v2.Compose(ops + _to_normalised_float(mean, std))


# ------------------------------------------------------------------------------------------------ fine-tuning
def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Timm's posterize, also for 0 bits: magnitudes near 10 ask for 0 bits, which Pillow >= 11 refuses.

    0 bits keeps nothing, i.e. a black image, which is what older Pillow versions returned.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Any) -> None:
    """Point the posterize ops of any timm RandAugment inside ``transform`` at :func:`_posterize`."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def finetune_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    in_chans: int,
    rand_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
) -> Any:
    """The training transform of MAE fine-tuning.

    Args:
        img_size: output side or ``(height, width)``.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel std.
        in_chans: channels of the images (1 or 3: timm's pipeline on PIL; others: tensors, no RandAugment).
        rand_augment: timm RandAugment string (the paper: ``rand-m9-mstd0.5-inc1``), or ``None``.
        reprob: random-erasing probability (the paper: 0.25, per-pixel random values).
        scale: RandomResizedCrop area range.
        hflip: random horizontal flip.

    Raises:
        ValueError: RandAugment asked for images that are neither grey nor RGB.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if in_chans in (1, 3):
        from timm.data import create_transform

        transform = create_transform(
            size,
            is_training=True,
            scale=scale,
            hflip=0.5 if hflip else 0.0,
            color_jitter=None,
            auto_augment=rand_augment,
            interpolation="bicubic",
            re_prob=reprob,
            re_mode="pixel",
            re_count=1,
            mean=tuple(mean),
            std=tuple(std),
        )
        _fix_posterize(transform)
        return transform
    if rand_augment:
        raise ValueError(
            f"RandAugment works on grey or RGB images, not {in_chans} channels; set finetune.rand_augment=null"
        )
    ops: list[Any] = [v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if reprob > 0:
        ops.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(ops)
