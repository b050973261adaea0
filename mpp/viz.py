"""Pictures people can read: reconstruction grids (original / masked / reconstruction / pasted) and curves."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from mpp.masking import unpatchify
from mpp.models.mae import MaskedAutoencoder


@torch.no_grad()
def reconstruction_rows(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Four display rows ``[0, 1]``: original, masked input, reconstruction, reconstruction with visible pasted.

    Args:
        model: the masked autoencoder (run in eval mode here).
        imgs: normalised input ``[N, C, H, W]``.
        mean: per-channel normalisation mean used to make ``imgs``.
        std: per-channel normalisation std.
        noise: optional ``[N, L]`` sort keys to fix the mask.

    Returns:
        ``[4*N, 3 or 1, H, W]`` ready for :func:`torchvision.utils.make_grid` with ``nrow=N``.
    """
    was_training = model.training
    model.eval()
    out = model(imgs, noise=noise)
    model.train(was_training)
    pred = model.pred_to_pixels(imgs, out.pred.float())  # norm-pix predictions mapped back per patch
    patch_mask = out.mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans)
    pixel_mask = unpatchify(patch_mask, model.patch_size, model.grid_size, model.in_chans)  # 1 = removed
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)

    def to_display(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1)

    original = to_display(imgs)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask  # removed patches shown grey
    recon = to_display(pred)
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    rows = torch.cat([original, masked, recon, pasted])
    if rows.shape[1] not in (1, 3):  # multispectral: show the first three bands
        rows = rows[:, :3] if rows.shape[1] > 3 else rows[:, :1]
    return rows.cpu()


def save_reconstruction_grid(
    path: str | Path,
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    noise: torch.Tensor | None = None,
    scale: int = 4,
) -> Path:
    """Write a PNG of :func:`reconstruction_rows`; small images are upscaled ``scale`` times for legibility."""
    rows = reconstruction_rows(model, imgs, mean, std, noise)
    if scale > 1:
        rows = torch.nn.functional.interpolate(rows, scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows, nrow=imgs.shape[0], padding=2, pad_value=1.0), path)
    return path
