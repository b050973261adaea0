"""Reconstructions people can read: original / masked / reconstruction / reconstruction with the visible pasted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from mpp.masking import unpatchify
from mpp.models.mae import MaskedAutoencoder
from mpp.runtime import atomic_save_image
from mpp.viz.text import pil_font, text_size

# The rows of :func:`reconstruction_rows`, named on the saved picture.
ROW_NAMES = ("original", "masked", "reconstruction", "visible pasted")
GRID_PADDING = 2


@dataclass
class Reconstruction:
    """Display images ``[N, C', H, W]`` in ``[0, 1]`` (C' is 1 or 3: multispectral shows its first three bands).

    Attributes:
        original: the input.
        masked: the input with removed patches grey.
        recon: the decoder's prediction for every patch; norm-pix predictions mapped back with statistics from the
            visible patches only (:func:`mpp.models.mae.visible_patch_stats`).
        pasted: ``recon`` on the removed patches, the input on the visible ones.
        recon_truth: for norm-pix models, the prediction mapped back with each hidden patch's *true* mean and std (the
            official visualisation's way: brightness and contrast leak from the truth); ``None`` otherwise.
        loss: the model's loss on this batch and mask.
    """

    original: torch.Tensor
    masked: torch.Tensor
    recon: torch.Tensor
    pasted: torch.Tensor
    recon_truth: torch.Tensor | None
    loss: float


def display_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images ``[N, C, H, W]`` back to ``[0, 1]`` on the CPU; multispectral keeps its first three bands."""
    m = torch.tensor(list(mean), device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[1] not in (1, 3):
        x = x[:, :3] if x.shape[1] > 3 else x[:, :1]
    return x.cpu()


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    noise: torch.Tensor | None = None,
    mask_ratio: float | None = None,
) -> Reconstruction:
    """Mask, reconstruct and turn everything into display images.

    Args:
        model: the masked autoencoder (run in eval mode here).
        imgs: normalised input ``[N, C, H, W]`` at the model's input size.
        mean: per-channel normalisation mean used to make ``imgs``.
        std: per-channel normalisation std.
        noise: optional ``[N, L]`` sort keys fixing the mask (see :func:`mpp.masking.make_noise`).
        mask_ratio: fraction removed; the model's own when ``None``.
    """
    was_training = model.training
    model.eval()
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    pred = out.pred.float()
    patch_mask = out.mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans)
    pixel_mask = unpatchify(patch_mask, model.patch_size, model.grid_size, model.in_chans)  # 1 = removed

    def to_display(x: torch.Tensor) -> torch.Tensor:
        return display_images(x, mean, std)

    original = to_display(imgs)
    display_mask = pixel_mask[:, : original.shape[1]].cpu()
    recon = to_display(model.pred_to_pixels(imgs, pred, mask=out.mask))
    truth = to_display(model.pred_to_pixels(imgs, pred)) if model.norm_pix_loss else None
    return Reconstruction(
        original=original,
        masked=original * (1 - display_mask) + 0.5 * display_mask,
        recon=recon,
        pasted=original * (1 - display_mask) + recon * display_mask,
        recon_truth=truth,
        loss=float(out.loss),
    )


def reconstruction_rows(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Four display rows ``[0, 1]``: original, masked input, reconstruction, reconstruction with visible pasted.

    Returns:
        ``[4*N, 3 or 1, H, W]`` ready for :func:`torchvision.utils.make_grid` with ``nrow=N``.
    """
    r = reconstruct(model, imgs, mean, std, noise)
    return torch.cat([r.original, r.masked, r.recon, r.pasted])


def save_reconstruction_grid(
    path: str | Path,
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    noise: torch.Tensor | None = None,
    scale: int = 4,
) -> Path:
    """Write a PNG of :func:`reconstruction_rows` with each row named; small images are upscaled ``scale`` times."""
    rows = reconstruction_rows(model, imgs, mean, std, noise)
    if scale > 1:
        rows = torch.nn.functional.interpolate(rows, scale_factor=scale, mode="nearest")
    grid = make_grid(rows, nrow=imgs.shape[0], padding=GRID_PADDING, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(with_row_names(grid, ROW_NAMES, rows.shape[-2]), path)
    return path


def with_row_names(grid: torch.Tensor, names: Sequence[str], cell_height: int) -> Image.Image:
    """The ``make_grid`` picture ``grid`` (``[C, H, W]`` in ``[0, 1]``) with ``names[i]`` left of row ``i``."""
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).convert("RGB")
    size = max(10, min(16, cell_height // 3))  # readable beside 28-px cells upscaled 4x and beside 224-px ones
    font = pil_font(size)
    draw = ImageDraw.Draw(picture)
    margin = max(text_size(draw, name, font)[0] for name in names) + 14
    out = Image.new("RGB", (picture.width + margin, picture.height), "white")
    out.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        _, height = text_size(draw, name, font)
        centre = GRID_PADDING + i * (cell_height + GRID_PADDING) + cell_height // 2
        draw.text((4, centre - height // 2), name, fill=(0, 0, 0), font=font)
    return out
