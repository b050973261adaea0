"""Procedural shapes: a labelled image set that needs no files, for smoke tests and laptop demos.

Class ``c`` has a family ``c % 4`` (full-frame stripes, disc, square, ring) and a variant ``c // 4``. Stripes
variants differ in orientation; shape variants are solid (variant 0) or filled with stripes at a variant-dependent
orientation. Position, size, rotation, stripe period and phase, brightness, per-channel gain and pixel noise are
random, so classes are separable well above chance (the shape and orientation carry the label) while a masked
autoencoder still has edges and textures to reconstruct.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from mpp.data.base import ImageDataset

FAMILIES = ("stripes", "disc", "square", "ring")
SPLITS = ("train", "val", "test")
# Pixel statistics of the generator in [0, 1], measured on 4096 images of 28x28; close for other sizes and classes.
MEAN, STD = 0.34, 0.22


def class_names(num_classes: int) -> list[str]:
    """Names of the ``num_classes`` classes, e.g. ``stripes-0deg``, ``disc``, ``disc-stripes90deg``."""
    names = []
    for c in range(num_classes):
        family, variant, count = c % 4, c // 4, len(range(c % 4, num_classes, 4))
        if family == 0:
            names.append("stripes" if count == 1 else f"stripes-{round(180 * variant / count)}deg")
        elif variant == 0:
            names.append(FAMILIES[family])
        else:
            names.append(f"{FAMILIES[family]}-stripes{round(180 * (variant - 1) / (count - 1))}deg")
    return names


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def make_shapes(
    num_images: int, img_size: int, in_chans: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate images ``uint8 [N, C, S, S]`` and balanced, shuffled labels ``int64 [N]``, deterministic in ``seed``."""
    if num_classes < 1 or num_images < 1 or img_size < 4 or in_chans < 1:
        raise ValueError(
            f"synthetic data needs >= 1 image, class and channel and size >= 4; got {num_images} images, "
            f"{num_classes} classes, {in_chans} channels, size {img_size}"
        )
    g = torch.Generator().manual_seed(seed)
    n, s = num_images, img_size
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    family, variant = labels % 4, labels // 4
    count = torch.tensor([len(range(c % 4, num_classes, 4)) for c in range(num_classes)])[labels]

    radius = _uniform(g, n, 0.22, 0.40) * s
    params = {
        "family": family,
        "radius": radius,
        "cx": radius + torch.rand(n, generator=g) * (s - 2 * radius),
        "cy": radius + torch.rand(n, generator=g) * (s - 2 * radius),
        "rot": _uniform(g, n, 0, math.pi / 2),
        "period": (_uniform(g, n, 3.0, 6.0) * s / 28).clamp(min=2.5),
        "phase": _uniform(g, n, 0, 2 * math.pi),
        "solid": (family != 0) & (variant == 0),
        "background": _uniform(g, n, 0.0, 0.35),
        "contrast": _uniform(g, n, 0.45, 0.65),
        "gain": _uniform(g, n * in_chans, 0.7, 1.0).view(n, in_chans),
    }
    # Stripes orientation: the class's own for the stripes family (jittered within its sector), for shapes the
    # variant's (variant 0 is solid); a lone stripes class gets any orientation.
    sector = math.pi / count.float()
    jitter = _uniform(g, n, -0.25, 0.25) * sector
    textured = (variant - 1).clamp(min=0) * math.pi / (count - 1).clamp(min=1)
    angle = torch.where(family == 0, variant * sector + jitter, textured)
    params["angle"] = torch.where((family == 0) & (count == 1), _uniform(g, n, 0, math.pi), angle)
    # Rendering in chunks bounds the float temporaries (4 masks of N x S x S) for large images.
    chunk = max(1, 2**22 // (s * s))
    images = torch.empty(n, in_chans, s, s, dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in params.items()}
        images[start : start + chunk] = _render(part, s, in_chans, g)
    return images, labels


def _render(p: dict[str, torch.Tensor], s: int, in_chans: int, g: torch.Generator) -> torch.Tensor:
    n = len(p["family"])
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, s, 1), coords.view(1, 1, s)

    def col(key: str) -> torch.Tensor:
        return p[key].view(n, 1, 1)

    dx, dy = xx - col("cx"), yy - col("cy")
    cos, sin, r = col("rot").cos(), col("rot").sin(), col("radius")
    dist = (dx**2 + dy**2).sqrt()
    family = col("family")
    # Soft edges (a sigmoid a pixel or so wide) keep the shapes anti-aliased at any size.
    disc = torch.sigmoid(2 * (r - dist))
    box = torch.maximum((dx * cos + dy * sin).abs(), (dy * cos - dx * sin).abs())
    mask = torch.where(family == 1, disc, torch.where(family == 2, torch.sigmoid(2 * (0.8 * r - box)), 1.0))
    mask = torch.where(family == 3, disc * torch.sigmoid(2 * (dist - 0.55 * r)), mask)
    angle = col("angle")
    stripes = 0.5 + 0.5 * torch.cos(2 * math.pi * (xx * angle.cos() + yy * angle.sin()) / col("period") + col("phase"))
    pattern = mask * torch.where(col("solid"), torch.ones_like(stripes), 0.25 + 0.75 * stripes)
    noise = 0.05 * torch.randn(n, in_chans, s, s, generator=g)
    gain = p["gain"].view(n, in_chans, 1, 1)
    images = col("background").unsqueeze(1) + col("contrast").unsqueeze(1) * gain * pattern.unsqueeze(1) + noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class SyntheticShapes(ImageDataset):
    """``size`` procedural images of ``num_classes`` classes (see the module docstring).

    Each split has its own seed (derived from ``seed`` and the split), so ``test`` never repeats ``train`` images.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each image (PIL for 1 or 3 channels, ``uint8 [C, S, S]`` tensor otherwise).
        in_chans: channels per image.
        size: images in the split.
        img_size: side of the square images.
        num_classes: number of classes.
        seed: base seed.
    """

    def __init__(
        self,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        in_chans: int = 1,
        size: int = 512,
        img_size: int = 28,
        num_classes: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(transform, in_chans)
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
        self.name = f"synthetic {split}"
        split_seed = seed * len(SPLITS) + SPLITS.index(split)
        self.images, labels = make_shapes(size, img_size, in_chans, num_classes, split_seed)
        self.targets = labels.tolist()
        self.classes = class_names(num_classes)

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """Item ``index`` as PIL (1 or 3 channels, like a decoded file) or a ``uint8`` tensor."""
        img = self.images[index]
        if self.in_chans == 1:
            return Image.fromarray(img[0].numpy())
        if self.in_chans == 3:
            return Image.fromarray(img.permute(1, 2, 0).numpy())
        return img
