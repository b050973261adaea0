"""Turning whatever PIL opens into the channel layout the model expects.

Rules (shared by the ``folder`` and ``hf`` sources):

- ``in_chans=1`` gives a PIL ``'L'`` image, ``in_chans=3`` a PIL ``'RGB'`` image. Grey images are repeated to RGB;
  colour images are reduced to luma (ITU-R 601, PIL's ``convert('L')``).
- Transparency (``RGBA``, ``LA``, ``P`` with a transparent index, ...) is composited onto black: the colour stored
  under a fully transparent pixel is arbitrary, so dropping alpha would feed the model whatever the encoder left
  there; black is defined and matches the common ``(0, 0, 0, 0)`` case.
- Palette ``P``, ``CMYK``, ``YCbCr``, ``HSV`` and bilevel ``1`` go through PIL's own conversion.
- High bit depth is rescaled, never clipped (PIL's ``convert('L')`` clips ``I;16`` so a mid-grey comes out white):
  ``I;16*`` and ``I`` are read as 16-bit (``v / 257``, values outside ``[0, 65535]`` clipped); float ``F`` images
  already in ``[0, 1]`` are scaled by 255, other float images are min-max scaled per image.
- Any other ``in_chans`` (2, 4, multispectral) gives a ``uint8 [C, H, W]`` tensor built from the image's bands
  and pages: a multi-page TIFF with one page per channel, or an image with exactly ``in_chans`` bands (``RGBA``,
  ``CMYK`` for 4). The same high-bit rescaling applies per page. Anything else is a :class:`ChannelMismatchError`.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from torchcodec.decoders import decode_jpeg

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ChannelMismatchError(ValueError):
    """An image cannot give the requested number of channels: a configuration mistake, not a broken file."""


def to_8bit(img: Image.Image) -> Image.Image:
    """Rescale a single-band high-bit-depth image (``I;16*``, ``I``, ``F``) to an ``'L'`` image."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        # Float images have no fixed range (reflectance, depth, ...): unless already in [0, 1], stretch this one.
        if lo < 0.0 or hi > 1.0:
            a = (a - lo) / max(hi - lo, 1e-12)
        a = a * 255.0
    else:
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(a).astype(np.uint8))


def _flatten(img: Image.Image) -> Image.Image:
    """Any PIL image as ``'L'`` or ``'RGB'`` at 8 bits, with transparency composited onto black."""
    if img.mode in _HIGH_BIT_MODES:
        return to_8bit(img)
    if img.mode in ("L", "RGB") and "transparency" not in img.info:
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def count_channels(img: Image.Image) -> int:
    """Channels :func:`convert_channels` stacks for ``in_chans`` other than 1 or 3, read from the header only."""
    bands = 3 if img.mode == "P" else len(img.getbands())
    return bands * getattr(img, "n_frames", 1)


def _stack_bands(img: Image.Image, in_chans: int) -> torch.Tensor:
    planes: list[np.ndarray] = []
    for frame in ImageSequence.Iterator(img):
        if frame.mode in _HIGH_BIT_MODES:
            planes.append(np.asarray(to_8bit(frame)))
            continue
        if frame.mode in ("P", "1"):
            frame = frame.convert("RGB" if frame.mode == "P" else "L")
        planes.extend(np.asarray(band) for band in frame.split())
    if len(planes) != in_chans:
        raise ChannelMismatchError(
            f"image of mode {img.mode} with {getattr(img, 'n_frames', 1)} page(s) gives {len(planes)} channels, "
            f"need in_chans={in_chans} (files give 1 or 3 channels by conversion; other counts only from a "
            "multi-page TIFF with one page per channel or an image with exactly that many bands)"
        )
    if len({p.shape for p in planes}) > 1:
        raise ValueError(f"pages differ in size: {sorted({p.shape for p in planes})}")
    return torch.from_numpy(np.stack(planes))


def convert_channels(img: Image.Image, in_chans: int) -> Image.Image | torch.Tensor:
    """Convert an opened PIL image to the model's channels (see the module docstring for the rules).

    Args:
        img: an opened image; it is fully decoded here, so decode errors (truncated files) surface from this call.
        in_chans: channels the model expects.

    Returns:
        A PIL ``'L'`` (``in_chans=1``) or ``'RGB'`` (``in_chans=3``) image, else a ``uint8 [C, H, W]`` tensor.
    """
    if in_chans not in (1, 3):
        return _stack_bands(img, in_chans)
    img.load()
    # Phone and camera photos store their rotation in EXIF; a malformed EXIF block is not worth losing the image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    flat = _flatten(img)
    return flat.convert("L" if in_chans == 1 else "RGB")


def to_uint8_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """A converted image as ``uint8 [C, H, W]`` (what a dataset returns when it has no transform)."""
    if isinstance(img, torch.Tensor):
        return img
    a = np.asarray(img)
    return torch.from_numpy(a.copy()).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a.transpose(2, 0, 1).copy())


def decode_bytes(data: bytes, in_chans: int) -> Image.Image | torch.Tensor:
    """An encoded image file's bytes, decoded and converted by :func:`convert_channels`'s rules.

    Baseline RGB and grey JPEGs wanted as RGB go through TorchCodec's ``decode_jpeg`` (libjpeg-turbo, EXIF
    orientation applied; it replaces torchvision's deprecated decoders): the same pixels as PIL's decode and
    conversion (tested), faster (benchmarks/bench_jpeg_decode.py), returned as a ``uint8 [3, H, W]`` tensor. Everything
    else (CMYK JPEGs, other formats, one channel: PIL's luma differs from the JPEG's own Y plane) goes through PIL.

    Raises:
        Exception: whatever PIL raises for a file that is not a readable image (a truncated JPEG included).
    """
    with Image.open(io.BytesIO(data)) as img:
        if in_chans == 3 and img.format == "JPEG" and img.mode in ("RGB", "L"):
            with contextlib.suppress(RuntimeError):  # broken data: PIL below raises its own, clearer error
                return decode_jpeg(data, mode="RGB")
        return convert_channels(img, in_chans)
