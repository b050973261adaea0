"""Decode + MAE augmentation throughput per CPU core for ImageNet-like JPEGs (and on the GPU when there is one).

No dataset can be downloaded here, so the script first writes a folder of synthetic 500x375 JPEGs (ImageNet's most
common size) with photo-like content: smooth colour gradients, shapes with edges, sensor noise, quality 90 (about
the byte size of an ImageNet JPEG, which is what decoding time follows). Then, with one thread in one process (so
the figure is per core), it times each pipeline over the folder and reports images/s:

- ``pil``: PIL decode + mpp's pretraining transform (RandomResizedCrop 224 scale 0.2-1 bicubic, flip, normalise):
  what a DataLoader worker of ``data.source=folder`` did per image before TorchCodec;
- ``pil_draft``: the same after PIL's JPEG draft mode, which decodes at 1/2, 1/4 or 1/8 scale in the DCT domain while
  keeping both sides >= 224 (faster, but a small crop then has fewer source pixels: not what mpp does today);
- ``mpp``: :func:`mpp.data.images.decode_bytes` (TorchCodec's ``decode_jpeg``, the same pixels as PIL) + the same
  transform on the uint8 tensor: what ``data.source=folder`` and ``shards`` workers do now;
- ``cuda_batch`` (only with a GPU): TorchCodec ``decode_jpeg(device="cuda")`` on a list of files at once (one nvJPEG
  call) + the transform on the GPU, images/s of the whole GPU (not per core).

    .venv/bin/python benchmarks/bench_jpeg_decode.py [--images 200] [--out benchmarks/results/jpeg_decode.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_facts, write_report
from PIL import Image, ImageDraw
from torchcodec.decoders import decode_jpeg

from mpp.data.images import decode_bytes
from mpp.data.transforms import pretrain_transform

SIZE = (500, 375)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """A 500x375 RGB image with gradients, a few filled shapes and noise: JPEG-compresses like a photo."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([c0 + c1 * x / w + c2 * y / h for c0, c1, c2 in rng.uniform(0, 120, (3, 3))], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 150)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_folder(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"img_{i:05d}.jpg"
        synthetic_photo(rng).save(path, quality=90)
        paths.append(path)
    return paths


def time_pipeline(paths: list[Path], load) -> float:
    torch.manual_seed(0)
    for path in paths[:5]:
        load(path)
    start = time.perf_counter()
    for path in paths:
        load(path)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/jpeg_decode.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = pretrain_transform(224, MEAN, STD)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_folder(Path(tmp), args.images)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024

        def pil(path: Path) -> torch.Tensor:
            with Image.open(path) as img:
                return transform(img.convert("RGB"))

        def pil_draft(path: Path) -> torch.Tensor:
            with Image.open(path) as img:
                img.draft("RGB", (224, 224))  # DCT-domain downscale by 1/2, 1/4 or 1/8 while keeping >= 224
                return transform(img.convert("RGB"))

        def ours(path: Path) -> torch.Tensor:
            return transform(decode_bytes(path.read_bytes(), 3))

        for name, fn in (("pil", pil), ("pil_draft", pil_draft), ("mpp", ours)):
            results[name] = time_pipeline(paths, fn)
            print(f"{name}: {results[name]:.1f} images/s per core", flush=True)
        if torch.cuda.is_available():
            datas = [p.read_bytes() for p in paths]
            gpu_tf = pretrain_transform(224, MEAN, STD)

            def cuda_batch() -> None:
                decoded = decode_jpeg(datas, device="cuda")
                torch.stack([gpu_tf(d) for d in decoded])
                torch.cuda.synchronize()

            cuda_batch()
            start = time.perf_counter()
            cuda_batch()
            results["cuda_batch"] = len(paths) / (time.perf_counter() - start)
            print(f"cuda_batch: {results['cuda_batch']:.1f} images/s (whole GPU)")
    report = {**machine_facts(), "images": args.images, "jpeg_kb": round(mean_kb, 1), "images_per_s": results}
    write_report(args.out, report)
    model = f"{report['cpu']} (AMX: {report['amx']})"
    print(f"\n{args.images} synthetic 500x375 JPEGs ({mean_kb:.0f} KB each), {model}, 1 thread\n")
    print("| pipeline | images/s | per |\n| --- | ---: | --- |")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} | {'GPU' if name.startswith('cuda') else 'CPU core'} |")


if __name__ == "__main__":
    main()
