"""Pretraining from memory: decode a small dataset once, then augment whole batches as tensors in the training process.

For sources that fit in memory (Fashion-MNIST is 47 MB as ``uint8``), the per-image path (a DataLoader worker running
PIL transforms and collating) costs a fifth of a 2-core CPU's time beside the model step. Here every image is decoded
and resized to the model's input once (:func:`decode_all`), and each batch is gathered from one ``uint8`` tensor,
cropped, flipped and normalised in a few batched ops (:func:`augment_batch`), with no worker process.

Determinism is the per-image path's: sample ``index`` of ``epoch`` draws its crop and flip from a generator seeded
with ``mix_seed(seed, epoch, index)`` and its mask noise exactly as :class:`~mpp.data.sampling.SeededPretrainSamples`
(so both paths mask identically), and the order is the same seeded :class:`~torch.utils.data.DistributedSampler`
permutation; a resumed or multi-process run sees the same samples. The crop is the paper's RandomResizedCrop (area
``scale``, aspect 3/4 to 4/3, ten tries then the centre crop), resampled bicubically with ``grid_sample``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mpp.data.sampling import epoch_order, mix_seed, sample_noise

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def decode_all(dataset: Any, img_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``dataset`` (built with ``transform=None``) as ``uint8 [N, C, H, W]`` at ``img_size``, and labels.

    Images of another size are resized (bicubic, shorter side) and centre-cropped once, as the evaluation transform.
    """
    resize = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(min(img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
        ]
    )
    images, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        image = v2.functional.to_image(image)
        if tuple(image.shape[-2:]) != tuple(img_size):
            image = resize(image)
        images.append(image.as_subclass(torch.Tensor))
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels)


def crop_box(generator: torch.Generator, height: int, width: int, scale: tuple[float, float]) -> tuple[int, ...]:
    """RandomResizedCrop's box ``(top, left, h, w)``: area in ``scale``, log-uniform aspect 3/4..4/3, 10 tries."""
    area = height * width
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        ratio = math.exp(LOG_RATIO[0] + u[1] * (LOG_RATIO[1] - LOG_RATIO[0]))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square (aspect within range for any image here)
    return (height - side) // 2, (width - side) // 2, side, side


def augment_batch(
    images: torch.Tensor,
    seeds: Sequence[int],
    scale: tuple[float, float],
    hflip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Crop, flip and normalise a batch, each sample with its own seeded generator.

    Args:
        images: ``uint8 [B, C, H, W]``.
        seeds: one per sample.
        scale: crop area range; ``(1, 1)`` means no crop.
        hflip: flip with probability 1/2.
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel std.

    Returns:
        ``float32 [B, C, H, W]``, normalised.
    """
    batch, _, height, width = images.shape
    x = images.float().div_(255)
    boxes, flips = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        boxes.append(crop_box(generator, height, width, scale) if scale[0] < 1.0 else (0, 0, height, width))
        flips.append(hflip and bool(torch.rand(1, generator=generator) < 0.5))
    if any(box != (0, 0, height, width) for box in boxes):
        # One affine grid per sample maps the output onto its box (align_corners=False pixel-centre convention).
        theta = torch.zeros(batch, 2, 3)
        for i, (top, left, h, w) in enumerate(boxes):
            theta[i, 0, 0] = w / width
            theta[i, 0, 2] = (2 * left + w) / width - 1
            theta[i, 1, 1] = h / height
            theta[i, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)
    flip = torch.tensor(flips)
    if flip.any():
        x[flip] = x[flip].flip(-1)
    m = torch.tensor(list(mean), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


class MemoryPretrainSamples:
    """Decoded training images with everything :meth:`epoch_batches` needs to make masked batches."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        grid_size: tuple[int, int],
        mask_ratio: float,
        mask_type: str,
        seed: int,
        scale: tuple[float, float],
        hflip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        base: Any = None,
    ) -> None:
        self.base = base  # the dataset the images came from (its skipped-files record)
        self.images, self.labels = images, labels
        self.grid_size, self.mask_ratio, self.mask_type = grid_size, mask_ratio, mask_type
        self.seed, self.scale, self.hflip = seed, scale, hflip
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, noise, labels)`` for these dataset indices in this epoch."""
        seeds = [mix_seed(self.seed, epoch, i) for i in indices]
        imgs = augment_batch(self.images[indices], seeds, self.scale, self.hflip, self.mean, self.std)
        noise = torch.stack([sample_noise(s, self.grid_size, self.mask_ratio, self.mask_type) for s in seeds])
        return imgs, noise, self.labels[indices]

    def epoch_batches(
        self, batch_size: int, epoch: int, *, rank: int = 0, world_size: int = 1, skip_batches: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's full batches of one epoch, in :class:`mpp.data.sampling.EpochLoader`'s order."""
        order = epoch_order(len(self), epoch, rank=rank, world_size=world_size, seed=self.seed)
        for start in range(skip_batches * batch_size, len(order) - batch_size + 1, batch_size):
            yield self.batch(order[start : start + batch_size], epoch)
