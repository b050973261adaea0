"""Text on PIL pictures (confusion matrices, efficiency curves, labelled reconstruction grids), without matplotlib."""

from __future__ import annotations

from typing import Any

from PIL import ImageDraw, ImageFont


def pil_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` pixels (the fixed bitmap font on Pillow < 10.1, which cannot scale)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``text`` drawn with ``font``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top
