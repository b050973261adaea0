"""The fine-tuning augmentation of the MAE paper, from timm: RandomResizedCrop, flip, RandAugment, random erasing.

timm's ``create_transform`` works on PIL images of 1 or 3 channels (Fashion-MNIST's grey 28x28 included). Images of
other channel counts (multispectral tensors) get the crop, flip and erasing from torchvision instead, and no
RandAugment, whose colour operations are defined for grey and RGB only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


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
            size, is_training=True, scale=scale, hflip=0.5 if hflip else 0.0, color_jitter=None,
            auto_augment=rand_augment, interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
            mean=tuple(mean), std=tuple(std),
        )  # fmt: skip
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
