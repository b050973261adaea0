"""End-to-end trainer images/s against the bare model step at the same batch (CPU or GPU, whatever runs it).

Three measurements, interleaved over ``--rounds`` so machine noise hits all alike:

- ``bare step``: forward + backward + AdamW on one fixed batch already in memory (the ceiling);
- ``trainer, in memory``: ``mpp pretrain`` on Fashion-MNIST with the default in-memory data path (decode once, batch
  augmentation in the training process, :mod:`mpp.data.memory`);
- ``trainer, per-image workers``: the same with ``data.in_memory=false`` (DataLoader workers run the transforms).

With ``--jpeg-images N`` (the GPU case: ViT-B/16 at 224, batch 256, bf16 on CUDA) the trainer reads a synthetic folder
of N 500x375 JPEGs (``data.source=folder``, ``--workers`` loader processes) instead of Fashion-MNIST.

Trainer runs cross two epoch ends, so the epoch-end checkpoint and reconstruction picture are inside the timing;
its images/s is total images over total time of the logged windows after the first (warm-up excluded). The kNN monitor
is off (its cost is stated separately by every run). Writes JSON and prints a markdown table.

    .venv/bin/python benchmarks/bench_trainer.py [--rounds 2] [--out benchmarks/results/trainer.json]
    python benchmarks/bench_trainer.py --jpeg-images 20000 --batch 256 --workers 14 --rounds 1    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_jpeg_decode import write_folder
from machine import machine_facts, write_report

import mpp
from mpp.config import PretrainConfig, build_config
from mpp.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from mpp.train.optim import pretrain_optimizer
from mpp.train.pretrain import run

# The demo recipe's model, batch and epoch (15k images, 117 steps): epoch ends come as often as in `make demo`.
VARIANT, BATCH, IMAGES_PER_EPOCH, LOG_EVERY = "mae_vit_tiny_patch4", 128, 15000, 10


def bare_step(variant: str, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of forward + backward + AdamW on one fixed batch already on the device (bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    model = mpp.create_model(variant, norm_pix_loss=True).to(device)
    optimizer = pretrain_optimizer(model, 1e-4, 0.05, (0.9, 0.95), None)  # fused on CUDA, as the trainer
    if variant == VARIANT:  # real Fashion-MNIST pixels, as the trainer sees them
        images, _ = load_fashion_mnist("train")
        imgs = ((images[:batch].float() / 255 - MEAN[0]) / STD[0]).unsqueeze(1).to(device)
    else:
        imgs = torch.randn(batch, model.in_chans, *model.img_size, device=device)
    noise = torch.rand(batch, model.num_patches, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(imgs, noise=noise).loss
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def trainer(source: list[str], variant: str, batch: int, epochs: int) -> float:
    """Images/s of ``mpp pretrain`` over the logged windows after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}/run", f"model.name={variant}", "model.norm_pix_loss=true", *source,
                     f"optim.epochs={epochs}", f"optim.batch_size={batch}", "optim.warmup_epochs=0",
                     "monitor.enabled=false", f"log_every={LOG_EVERY}", "progress=false"]  # fmt: skip
        run(build_config(PretrainConfig, None, overrides))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r.get("stage") == "pretrain" and "images_per_s" in r][1:]
    images = LOG_EVERY * batch
    return len(rates) * images / sum(images / r for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--jpeg-images",
        type=int,
        default=0,
        help="instead of Fashion-MNIST: a synthetic folder of this many 500x375 JPEGs (the GPU case)",
    )
    parser.add_argument("--variant", default=None, help=f"default {VARIANT}; mae_vit_base_patch16 with --jpeg-images")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the per-image path")
    parser.add_argument("--out", default="benchmarks/results/trainer.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = args.variant or ("mae_vit_base_patch16" if args.jpeg_images else VARIANT)
    with tempfile.TemporaryDirectory() as folder:
        if args.jpeg_images:
            write_folder(Path(folder), args.jpeg_images)
            images_per_epoch = args.jpeg_images
            loops = {"trainer, JPEG folder": ["data.source=folder", f"data.path={folder}",
                                              f"data.num_workers={args.workers}"]}  # fmt: skip
        else:
            images_per_epoch = IMAGES_PER_EPOCH
            fmnist = ["data.source=fashion-mnist", f"data.limit={IMAGES_PER_EPOCH}", "data.crop_scale_min=1.0",
                      f"data.num_workers={args.workers}"]  # fmt: skip
            loops = {"trainer, in memory": [*fmnist, "data.in_memory=true"],
                     "trainer, per-image workers": [*fmnist, "data.in_memory=false"]}  # fmt: skip
        results: dict[str, list[float]] = {"bare step": [], **{name: [] for name in loops}}
        steps = max(10, args.epochs * (images_per_epoch // args.batch) - LOG_EVERY)
        for round_ in range(args.rounds):
            results["bare step"].append(bare_step(variant, args.batch, steps, device))
            for name, source in loops.items():
                results[name].append(trainer(source, variant, args.batch, args.epochs))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in results.items()}
    bare = medians["bare step"]
    report = {**machine_facts(), "variant": variant, "batch": args.batch, "rounds": args.rounds,
              "jpeg_images": args.jpeg_images, "workers": args.workers, "images_per_s": results,
              "median": medians, "ratio_to_bare": {k: v / bare for k, v in medians.items()}}  # fmt: skip
    write_report(args.out, report)
    where = f"{report['cuda'] or report['cpu']} (AMX: {report['amx']}), {report['threads']} threads"
    print(f"\n{variant}, batch {args.batch}, {where}, median of {args.rounds}\n")
    print("| loop | images/s | / bare step |\n| --- | ---: | ---: |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / bare:.2f} |")


if __name__ == "__main__":
    main()
