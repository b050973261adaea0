"""Drawing ``mpp visualize``'s pictures with matplotlib (the optional extra ``mpp[viz]``).

Every function takes display-ready tensors (images in ``[0, 1]``, maps from :mod:`~mpp.viz.attention`), writes one PNG
and returns its path. matplotlib is imported only here and only when a picture is drawn, with the Agg backend (files, no
window), so the base install and the training commands never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpp.runtime import atomic_path
from mpp.viz.reconstruction import Reconstruction

EXTRA_HINT = "pip install 'mpp[viz]'"
DPI = 100


class MissingExtraError(ImportError):
    """An optional dependency of a command is not installed."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a one-line :class:`MissingExtraError` naming the extra."""
    try:
        import matplotlib
    except ImportError as err:
        raise MissingExtraError(f"drawing needs matplotlib, which is not installed: {EXTRA_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_hwc(img: torch.Tensor) -> Any:
    """``[C, H, W]`` in ``[0, 1]`` -> numpy ``[H, W]`` (grey) or ``[H, W, 3]`` for ``imshow``."""
    img = img.detach().float().clamp(0, 1).cpu()
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _show(ax: Any, img: torch.Tensor) -> None:
    ax.imshow(_as_hwc(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(plt: Any, rows: int, cols: int, cell: float = 1.6, title: str | None = None) -> tuple[Any, Any]:
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + (0.4 if title else 0)), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def reconstruction_figure(path: Path, rec: Reconstruction, title: str) -> Path:
    """One row per image: original, masked, reconstruction, visible pasted (and the truth-statistics version).

    Args:
        path: PNG to write.
        rec: from :func:`mpp.viz.reconstruct`.
        title: the figure's title (mask type and ratio).
    """
    plt = pyplot()
    columns = [
        ("original", rec.original),
        ("masked", rec.masked),
        ("reconstruction", rec.recon),
        ("visible pasted", rec.pasted),
    ]
    if rec.recon_truth is not None:
        columns.append(("recon., true patch stats", rec.recon_truth))
    fig, axes = _grid(plt, rec.original.shape[0], len(columns), title=title)
    for col, (name, imgs) in enumerate(columns):
        axes[0, col].set_title(name, fontsize=8)
        for row in range(imgs.shape[0]):
            _show(axes[row, col], imgs[row])
    return _save(plt, fig, path)


def _overlay(ax: Any, img: torch.Tensor, heat: torch.Tensor) -> None:
    """``img`` in grey with ``heat`` (a patch-grid map) upsampled over it, scaled to its own maximum."""
    size = img.shape[-2:]
    up = F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up / up.max().clamp_min(1e-12)
    ax.imshow(_as_hwc(img.mean(dim=0, keepdim=True)), cmap="gray", vmin=0, vmax=1)
    ax.imshow(up.cpu().numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(
    path: Path, images: torch.Tensor, per_head: torch.Tensor, rollout: torch.Tensor, title: str
) -> Path:
    """One row per image: the image, each head's map, the heads' mean, and the rollout, as heat maps over it.

    Args:
        path: PNG to write.
        images: display images ``[N, C, H, W]``.
        per_head: last block's maps ``[N, heads, h, w]`` (:func:`mpp.viz.attention.query_attention`).
        rollout: rollout maps ``[N, h, w]``.
        title: the figure's title.
    """
    plt = pyplot()
    heads = per_head.shape[1]
    fig, axes = _grid(plt, images.shape[0], heads + 3, title=title)
    names = ["image"] + [f"head {h}" for h in range(heads)] + ["mean of heads", "rollout"]
    for col, name in enumerate(names):
        axes[0, col].set_title(name, fontsize=8)
    for row in range(images.shape[0]):
        _show(axes[row, 0], images[row])
        for h in range(heads):
            _overlay(axes[row, h + 1], images[row], per_head[row, h])
        _overlay(axes[row, heads + 1], images[row], per_head[row].mean(dim=0))
        _overlay(axes[row, heads + 2], images[row], rollout[row])
    return _save(plt, fig, path)


def similarity_mosaic(similarity: torch.Tensor, max_side: int = 14) -> torch.Tensor:
    """Arrange ``[h, w, h, w]`` maps as one picture, a one-pixel NaN gap between maps.

    Grids wider than ``max_side`` show every k-th patch's map (each map still at full resolution).

    Returns:
        ``[rows * (h + 1) - 1, cols * (w + 1) - 1]`` float, NaN in the gaps.
    """
    h, w = similarity.shape[:2]
    step_r, step_c = -(-h // max_side), -(-w // max_side)
    picks_r, picks_c = list(range(0, h, step_r)), list(range(0, w, step_c))
    out = torch.full((len(picks_r) * (h + 1) - 1, len(picks_c) * (w + 1) - 1), float("nan"))
    for i, r in enumerate(picks_r):
        for j, c in enumerate(picks_c):
            out[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = similarity[r, c]
    return out


def position_figure(path: Path, similarity: torch.Tensor, title: str) -> Path:
    """The ViT paper's picture: one small map per patch, its position embedding's cosine similarity to all others."""
    plt = pyplot()
    mosaic = similarity_mosaic(similarity)
    side = max(4.0, min(12.0, mosaic.shape[1] / 8))
    fig, ax = plt.subplots(figsize=(side + 1.2, side * mosaic.shape[0] / mosaic.shape[1] + 0.5))
    # The colour range is the table's own (sin-cos tables of small grids sit in [0.7, 1]: a fixed [-1, 1] hides them).
    low = float(similarity.min())
    image = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=low, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.04, label="cosine similarity")
    return _save(plt, fig, path)


def pca_figure(path: Path, images: torch.Tensor, joint: torch.Tensor, per_image: torch.Tensor, title: str) -> Path:
    """Each image above its patch tokens' first three principal components as RGB: fitted jointly, and per image."""
    plt = pyplot()
    count = images.shape[0]
    fig, axes = _grid(plt, 3, count, title=title)
    for col in range(count):
        _show(axes[0, col], images[col])
        _show(axes[1, col], joint[col])
        _show(axes[2, col], per_image[col])
    for row, name in enumerate(["image", "PCA, all images", "PCA, per image"]):
        axes[row, 0].set_ylabel(name, fontsize=8)
    return _save(plt, fig, path)
