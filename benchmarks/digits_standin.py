"""A small, easy grey folder for the monitor's dip: typeset digits at 8x8 with 17 grey levels, shown at 32 px.

Issue 20's small-folder run (under 2k grey 32 px images, raw-pixel kNN 97.5%) saw its kNN monitor fall below random
init mid-run. That dataset is kept aside for checking the rules, so this stand-in of the same kind reproduces the dip:
1,797 digits drawn in the DejaVu fonts (Debian's ``fonts-dejavu-core``), randomly sized, shifted, stroked and rotated
(sd 20 degrees), cropped to their ink, box-averaged to 8x8, quantised to 17 levels (as the UCI digits), shown at 32 px
bilinear; every fifth image is a test image (``ROOT/{train,test}/<digit>/<i>.png``: 1,437 / 360). Raw-pixel kNN on it
(k 20, cosine, T 0.07): 99.4%.

    .venv/bin/python benchmarks/digits_standin.py runs/variants/data/digits32
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS = "/usr/share/fonts/truetype/dejavu/*.ttf"


def write_digits(root: Path, count: int = 1797, seed: int = 0) -> None:
    """Write the folder (skipped when ``root/done`` exists)."""
    if (root / "done").is_file():
        return
    fonts = sorted(glob.glob(FONTS))
    if not fonts:
        raise SystemExit(f"no fonts at {FONTS}: apt install fonts-dejavu-core")
    rng = np.random.default_rng(seed)
    for i in range(count):
        digit = int(rng.integers(10))
        big = Image.new("L", (64, 64), 0)
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(34, 52)))
        where = (32 + rng.normal(0, 3), 32 + rng.normal(0, 3))
        stroke = int(rng.integers(0, 3))
        draw = ImageDraw.Draw(big)
        draw.text(where, str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
        big = big.rotate(float(rng.normal(0, 20)), resample=Image.BILINEAR)
        small = np.asarray(big.crop(big.getbbox() or (0, 0, 64, 64)).resize((8, 8), Image.BOX), np.float32)
        small = np.round(small / 255 * 16) / 16 * 255  # 17 grey levels
        folder = root / ("test" if i % 5 == 0 else "train") / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small.astype(np.uint8)).resize((32, 32), Image.BILINEAR).save(folder / f"{i}.png")
    (root / "done").write_text("ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int, default=1797)
    args = parser.parse_args()
    write_digits(args.root, args.count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
