"""End-to-end trainer images/s against the bare model step at the same batch (CPU or GPU, whatever runs it).

Three measurements, interleaved over ``--rounds`` so machine noise hits all alike:

- ``bare step``: forward + backward + AdamW on one fixed batch already in memory (the ceiling);
- ``trainer, in memory``: ``mpp pretrain`` on Fashion-MNIST with the default in-memory data path (decode once, batch
  augmentation in the training process, :mod:`mpp.data.memory`);
- ``trainer, per-image workers``: the same with ``data.in_memory=false`` (a DataLoader worker runs PIL transforms).

Trainer runs cross two epoch ends, so the epoch-end checkpoint and reconstruction picture are inside the timing;
its images/s is total images over total time of the logged windows after the first (warm-up excluded). The kNN monitor
is off (its cost is stated separately by every run). Writes JSON and prints a markdown table.

    .venv/bin/python benchmarks/bench_trainer.py [--rounds 2] [--out benchmarks/results/trainer.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_facts, write_report

import mpp
from mpp.config import PretrainConfig, build_config
from mpp.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from mpp.optim import pretrain_optimizer
from mpp.pretrain import run

# The demo recipe's model, batch and epoch (15k images, 117 steps): epoch ends come as often as in `make demo`.
VARIANT, BATCH, IMAGES_PER_EPOCH, LOG_EVERY = "mae_vit_tiny_patch4", 128, 15000, 10


def bare_step(steps: int) -> float:
    """Images/s of forward + backward + AdamW on one fixed Fashion-MNIST batch."""
    torch.manual_seed(0)
    model = mpp.create_model(VARIANT, norm_pix_loss=True)
    optimizer = pretrain_optimizer(model, 1e-4, 0.05, (0.9, 0.95), None)
    images, _ = load_fashion_mnist("train")
    imgs = ((images[:BATCH].float() / 255 - MEAN[0]) / STD[0]).unsqueeze(1)
    noise = torch.rand(BATCH, model.num_patches)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(imgs, noise=noise).loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def trainer(in_memory: bool, epochs: int) -> float:
    """Images/s of ``mpp pretrain`` over the logged windows after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}/run", f"model.name={VARIANT}", "model.norm_pix_loss=true",
                     "data.source=fashion-mnist", f"data.limit={IMAGES_PER_EPOCH}", "data.crop_scale_min=1.0",
                     f"data.in_memory={str(in_memory).lower()}", "data.num_workers=1", f"optim.epochs={epochs}",
                     f"optim.batch_size={BATCH}", "optim.warmup_epochs=0", "monitor.enabled=false",
                     f"log_every={LOG_EVERY}", "progress=false"]  # fmt: skip
        run(build_config(PretrainConfig, None, overrides))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r.get("stage") == "pretrain" and "images_per_s" in r][1:]
    images = LOG_EVERY * BATCH
    return len(rates) * images / sum(images / r for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/trainer.json")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"bare step": [], "trainer, in memory": [], "trainer, per-image workers": []}
    steps = args.epochs * (IMAGES_PER_EPOCH // BATCH) - LOG_EVERY
    for round_ in range(args.rounds):
        results["bare step"].append(bare_step(steps))
        results["trainer, in memory"].append(trainer(True, args.epochs))
        results["trainer, per-image workers"].append(trainer(False, args.epochs))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in results.items()}
    bare = medians["bare step"]
    report = {**machine_facts(), "variant": VARIANT, "batch": BATCH, "rounds": args.rounds, "images_per_s": results,
              "median": medians, "ratio_to_bare": {k: v / bare for k, v in medians.items()}}  # fmt: skip
    write_report(args.out, report)
    where = f"{report['cpu']} (AMX: {report['amx']}), {report['threads']} threads"
    print(f"\n{VARIANT}, batch {BATCH}, {where}, median of {args.rounds}\n")
    print("| loop | images/s | / bare step |\n| --- | ---: | ---: |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / bare:.2f} |")


if __name__ == "__main__":
    main()
