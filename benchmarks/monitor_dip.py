"""What the encoder holds at each saved checkpoint of a pretraining on a class folder: kNN of four readouts.

For every ``RUN/checkpoints/step_*`` (and the random init of the same architecture): weighted cosine kNN (k 20, T 0.07;
the folder's train split the bank, its test split the queries) on the mean patch token and on the flattened token map,
each plain and centred on the bank's mean, and the share of the mean-token features' energy in their top direction.
Written for the monitor's dip (docs/own-images.md): is the class information gone from the encoder, or only from the
pooled vector the monitor reads?

    .venv/bin/python benchmarks/monitor_dip.py runs/variants/data/digits32 runs/dip/A_issue runs/dip/B_warm300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mpp.eval.encoders import load_init
from mpp.neighbours import knn_scores


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images ``[N, 1, H, W]`` in [0, 1] and labels of ``root/split/<class>/*.png``."""
    files = sorted((root / split).glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) for f in files]) / 255
    return torch.from_numpy(images)[:, None], torch.tensor([int(f.parent.name) for f in files])


def knn_top1(
    bank: torch.Tensor, bank_y: torch.Tensor, queries: torch.Tensor, query_y: torch.Tensor, centre: bool
) -> float:
    """kNN top-1 (%), optionally centred on the bank's mean."""
    if centre:
        mean = bank.mean(0)
        bank, queries = bank - mean, queries - mean
    votes = knn_scores(bank, bank_y, queries, int(bank_y.max()) + 1, 20, 0.07)
    return round(100.0 * (votes.argmax(1) == query_y).float().mean().item(), 1)


@torch.no_grad()
def readouts(encoder: torch.nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The four kNN readings and the top-direction share of one encoder."""
    encoder.eval()
    (bank, bank_y), (queries, query_y) = data["train"], data["test"]
    tb, tq = encoder.forward_features(bank)[:, 1:], encoder.forward_features(queries)[:, 1:]
    singular = torch.linalg.svdvals(F.normalize(tb.mean(1), dim=1))
    return {
        "avg": knn_top1(tb.mean(1), bank_y, tq.mean(1), query_y, False),
        "avg_centred": knn_top1(tb.mean(1), bank_y, tq.mean(1), query_y, True),
        "tokens": knn_top1(tb.flatten(1), bank_y, tq.flatten(1), query_y, False),
        "tokens_centred": knn_top1(tb.flatten(1), bank_y, tq.flatten(1), query_y, True),
        "top_direction_share": round((singular[0] ** 2 / (singular**2).sum()).item(), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    data = {split: load_split(args.folder, split) for split in ("train", "test")}
    mean, std = data["train"][0].mean(), data["train"][0].std()  # as the run's fingerprint measures them
    normed = {split: ((x - mean) / std, y) for split, (x, y) in data.items()}
    for run in args.runs:
        checkpoints = sorted((run / "checkpoints").glob("step_*"))
        shape, _ = load_init(str(checkpoints[0]))
        torch.manual_seed(0)  # the same architecture at random init (mpp's seed 0)
        random, _ = load_init("random", "mae_vit_tiny_patch4", img_size=shape.img_size[0], patch_size=shape.patch_size,
                              in_chans=shape.in_chans)  # fmt: skip
        print(f"{run.name} random init: {readouts(random, normed)}", flush=True)
        for ckpt in checkpoints:
            print(f"{ckpt.parent.parent.name} {ckpt.name}: {readouts(load_init(str(ckpt))[0], normed)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
