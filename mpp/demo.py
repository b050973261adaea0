"""``mpp demo``: reconstruct a few Fashion-MNIST test images with a freshly built small MAE."""

from __future__ import annotations

import argparse

import torch

from mpp.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from mpp.models import create_model
from mpp.viz import save_reconstruction_grid


def main(argv: list[str] | None = None) -> int:
    """Run the demo."""
    parser = argparse.ArgumentParser(prog="mpp demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo/reconstruction.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images, _ = load_fashion_mnist("test")
    imgs = (images[:8].float().div(255).unsqueeze(1) - MEAN[0]) / STD[0]
    model = create_model("mae_vit_tiny_patch4", norm_pix_loss=True)
    with torch.no_grad():
        loss = model(imgs).loss.item()
    path = save_reconstruction_grid(args.out, model, imgs, MEAN, STD)
    print(f"untrained mae_vit_tiny_patch4 on 8 Fashion-MNIST test images: norm-pix loss {loss:.4f}")
    print(f"reconstruction grid (original / masked / reconstruction / pasted): {path}")
    return 0
