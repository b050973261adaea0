"""Start-up time on a large image set: a 100k-file folder and the same images as tar shards.

Writes ``--files`` small JPEGs (32x32, 10 class folders; small so the disk, not decoding, is what a scan would pay),
then times:

- ``folder``: building the ``data.source=folder`` dataset (directory listing, a few decode checks) and its first item;
- ``mpp shard``: packing the folder into shards (a one-off cost, like any dataset conversion);
- ``shards``: building the ``data.source=shards`` dataset (reads ``index.json`` only) and its first item;
- ``pretrain on shards``: ``mpp pretrain`` from the command's start to the end of its first optimiser step
  (``stop_at_step=1``, micro model), i.e. what a user waits before training runs.

    .venv/bin/python benchmarks/bench_startup.py [--files 100000] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_facts, write_report
from PIL import Image

from mpp.config import PretrainConfig, build_config
from mpp.data import build_dataset
from mpp.data.shards import write_shards
from mpp.train.pretrain import run


def write_files(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
    for i in range(count):
        folder = root / f"class_{i % 10}"
        if i < 10:
            folder.mkdir(parents=True)
        tiles[i % 64].save(folder / f"img_{i:06d}.jpg", quality=85)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--out", default="benchmarks/results/startup.json")
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images, shards = Path(tmp) / "images", Path(tmp) / "shards"
        seconds["writing the files (setup, not start-up)"], _ = timed(lambda: write_files(images, args.files))
        seconds["folder: dataset + first item"], _ = timed(
            lambda: build_dataset("folder", "train", None, path=str(images), in_chans=3)[0]
        )
        seconds["mpp shard (one-off)"], _ = timed(lambda: write_shards(images, shards, 10_000, 3))
        seconds["shards: dataset + first item"], _ = timed(
            lambda: build_dataset("shards", "train", None, path=str(shards), in_chans=3)[0]
        )
        overrides = [f"output_dir={tmp}/run", "model.name=mae_vit_micro_patch4", "model.img_size=32",
                     "model.in_chans=3", "data.source=shards", f"data.path={shards}", "data.num_workers=1",
                     "optim.batch_size=64", "stop_at_step=1", "monitor.enabled=false", "progress=false"]  # fmt: skip
        seconds["pretrain on shards: start to first step done"], _ = timed(
            lambda: run(build_config(PretrainConfig, None, overrides))
        )
    write_report(args.out, {**machine_facts(), "files": args.files, "seconds": seconds})
    print(f"\n{args.files} files\n\n| step | seconds |\n| --- | ---: |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
