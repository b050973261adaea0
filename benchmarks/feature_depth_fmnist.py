"""Which features of a Fashion-MNIST encoder classify best: each block's average-pooled tokens, the cls token, concat.

For one set of MAE weights (a checkpoint's model.safetensors, an encoder.safetensors, or ``random``), extracts the
pooled output of every block for ``--per-class`` labelled training images and the 10k test images, then reports
weighted kNN (k 20, T 0.07) and a quick linear probe (standardised features, AdamW, 60 epochs) per feature set. A
search aid for recipes (which pooling and blocks to read out), cheaper than running ``mpp evaluate`` per setting.

    .venv/bin/python benchmarks/feature_depth_fmnist.py runs/fmnist_tiny/encoder.safetensors [--per-class 1000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mpp
from mpp.data import build_dataset, default_stats
from mpp.eval.labels import label_subset
from mpp.neighbours import knn_scores


def load_split(split: str, keep: list[int] | None, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``[N, 1, 28, 28]`` images and labels (Fashion-MNIST is already 28x28: no resize)."""
    ds = build_dataset("fashion-mnist", split, None)
    x = ((ds.images.float() / 255 - mean) / std).unsqueeze(1)
    y = torch.tensor(ds.targets)
    if keep is not None:
        x, y = x[keep], y[keep]
    return x, y


@torch.no_grad()
def block_features(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    """``avg<i>``: LayerNorm of the mean patch token after block i; ``cls``: the final-norm cls token."""
    out: dict[str, list[torch.Tensor]] = {}
    for b in range(0, len(x), batch):
        t = model.prepend_cls(model.embed_patches(x[b : b + batch]))
        for i, blk in enumerate(model.blocks):
            t = blk(t)
            out.setdefault(f"avg{i + 1}", []).append(F.layer_norm(t[:, 1:].mean(1), (t.shape[-1],), eps=1e-6))
        out.setdefault("cls", []).append(model.norm(t)[:, 0])
    feats = {k: torch.cat(v) for k, v in out.items()}
    depth = len(model.blocks)
    feats["avg_last2"] = torch.cat([feats[f"avg{i}"] for i in range(depth - 1, depth + 1)], 1)
    feats["avg_last4"] = torch.cat([feats[f"avg{i}"] for i in range(depth - 3, depth + 1)], 1)
    return feats


def quick_probe(a: torch.Tensor, ya: torch.Tensor, b: torch.Tensor, yb: torch.Tensor, epochs: int = 60) -> float:
    """Test top-1 (%) of a linear classifier on standardised features."""
    torch.manual_seed(0)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    lin = torch.nn.Linear(a.shape[1], int(ya.max()) + 1)
    opt = torch.optim.AdamW(lin.parameters(), 1e-3, weight_decay=1e-4)
    steps_per_epoch = (len(a) + 255) // 256
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(a))
        for s in range(0, len(a), 256):
            i = perm[s : s + 256]
            loss = F.cross_entropy(lin(a[i]), ya[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return 100 * (lin(b).argmax(1) == yb).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="model.safetensors / encoder.safetensors of mae_vit_tiny_patch4, or 'random'")
    parser.add_argument("--model", default="mae_vit_tiny_patch4")
    parser.add_argument("--per-class", type=int, default=1000, help="labelled training images per class (0 = all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mpp.create_model(args.model)
    if args.weights != "random":
        missing = model.load_state_dict(load_file(args.weights), strict=False).missing_keys
        if any(not k.startswith("decoder") and k != "mask_token" for k in missing):
            raise SystemExit(f"{args.weights}: missing encoder weights {missing[:3]}")
    model.eval()
    (mean,), (std,) = default_stats("fashion-mnist", 1)
    targets = build_dataset("fashion-mnist", "train", None).targets
    keep = label_subset(targets, labels_per_class=args.per_class, seed=0) if args.per_class else None
    (xtr, ytr), (xte, yte) = load_split("train", keep, mean, std), load_split("test", None, mean, std)
    start = time.perf_counter()
    ftr, fte = block_features(model, xtr), block_features(model, xte)
    print(f"{args.weights}: features of {len(xtr)} + {len(xte)} images in {time.perf_counter() - start:.0f} s")
    print("| features | kNN | linear probe |\n|---|---:|---:|")
    for name in ftr:
        votes = knn_scores(ftr[name], ytr, fte[name], int(ytr.max()) + 1)
        knn = 100 * (votes.argmax(1) == yte).float().mean().item()
        print(f"| {name} | {knn:.2f} | {quick_probe(ftr[name], ytr, fte[name], yte):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
