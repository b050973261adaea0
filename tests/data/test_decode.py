"""JPEG bytes decoded by torchvision give exactly the pixels of the PIL path, and broken files still raise."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mpp.data.images import convert_channels, decode_bytes, to_uint8_tensor


def _jpeg(mode: str, orientation: int | None = None) -> bytes:
    rng = np.random.RandomState(0)
    shape = (30, 20) if mode == "L" else (30, 20, len(mode))
    img = Image.fromarray((rng.rand(*shape) * 255).astype(np.uint8), mode=mode if mode != "L" else None)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _via_pil(data: bytes, in_chans: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return to_uint8_tensor(convert_channels(img, in_chans))


@pytest.mark.parametrize(("mode", "orientation"), [("RGB", None), ("L", None), ("RGB", 6), ("CMYK", None)])
def test_decoded_pixels_equal_the_pil_path(mode: str, orientation: int | None):
    data = _jpeg(mode, orientation)
    for in_chans in (1, 3):
        ours = to_uint8_tensor(decode_bytes(data, in_chans))
        assert torch.equal(ours, _via_pil(data, in_chans)), (mode, orientation, in_chans)
    if orientation == 6:  # rotated by EXIF: 30x20 stored, 20x30 shown
        assert tuple(decode_bytes(data, 3).shape[-2:]) == (20, 30)
    fast = mode in ("RGB", "L")  # baseline RGB/grey JPEGs as RGB take torchvision's decoder
    assert isinstance(decode_bytes(data, 3), torch.Tensor) == fast


def test_truncated_jpeg_raises():
    data = _jpeg("RGB")
    with pytest.raises(OSError, match="truncated"):
        decode_bytes(data[: len(data) // 2], 3)
