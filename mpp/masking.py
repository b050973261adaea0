"""Patch and mask maths as plain functions.

Layouts follow the official MAE code: ``patchify`` gives ``[N, h*w, p*p*C]`` with patches in row-major grid order
and the channels last inside each patch. A mask is ``[N, L]`` with 1 = removed (hidden from the encoder).

Every masking strategy ends in :func:`random_masking`: block and grid masks are turned into a sort key ("noise")
whose argsort puts the kept patches first, so the encoder and decoder see the same shuffle/unshuffle machinery
whatever the strategy.
"""

from __future__ import annotations

import math

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened patches.

    Args:
        imgs: ``[N, C, H, W]`` with H and W divisible by ``patch_size``.
        patch_size: side ``p`` of a square patch.

    Returns:
        ``[N, h*w, p*p*C]`` with ``h = H/p``, ``w = W/p``; each patch is ``(p, p, C)`` flattened (channels last).
    """
    n, c, height, width = imgs.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size {p}")
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``[N, h*w, p*p*C]``.
        patch_size: side ``p`` of a square patch.
        grid_size: ``(h, w)`` patches along height and width.
        in_chans: channel count ``C``.

    Returns:
        ``[N, C, h*p, w*p]``.
    """
    n, length, dim = patches.shape
    h, w = grid_size
    p = patch_size
    if length != h * w or dim != p * p * in_chans:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {h}x{w}, patch {p}, {in_chans} channels"
        )
    x = patches.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Tokens the encoder sees: ``int(L * (1 - ratio))``, as in the official code."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise.

    Args:
        x: tokens ``[N, L, D]``.
        mask_ratio: fraction of tokens removed.
        noise: optional ``[N, L]`` sort keys; the smallest ``int(L*(1-ratio))`` are kept. Pass it for reproducible
            masks (or to realise a block/grid mask, see :func:`mask_to_noise`).

    Returns:
        ``(x_kept [N, len_keep, D], mask [N, L] with 1 = removed, ids_restore [N, L])``; ``ids_restore`` maps the
        shuffled order back to grid order.
    """
    n, length, dim = x.shape
    len_keep = num_kept(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def mask_to_noise(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn a boolean/0-1 mask ``[N, L]`` (1 = removed) into sort keys that keep exactly its 0 entries first."""
    jitter = torch.rand(mask.shape, generator=generator, device=mask.device) * 0.5
    return mask.float() + jitter


def _fix_count(mask: torch.Tensor, num_masked: int, generator: torch.Generator | None) -> torch.Tensor:
    """Add or drop random patches of a 1-D mask so exactly ``num_masked`` are removed (keeps batch shapes equal)."""
    diff = num_masked - int(mask.sum())
    if diff > 0:
        candidates = (~mask).nonzero().flatten()
        pick = candidates[torch.randperm(len(candidates), generator=generator)[:diff]]
        mask[pick] = True
    elif diff < 0:
        candidates = mask.nonzero().flatten()
        pick = candidates[torch.randperm(len(candidates), generator=generator)[:-diff]]
        mask[pick] = False
    return mask


def block_mask(
    batch: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    min_block: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT-style block-wise masks: rectangles of random area and aspect ratio until the ratio is reached.

    Blocks may overlap; the final count is topped up or trimmed at random so every sample removes exactly
    ``L - int(L*(1-ratio))`` patches, as the encoder needs equal token counts across the batch.

    Args:
        batch: number of masks ``N``.
        grid_size: ``(h, w)``.
        mask_ratio: fraction removed.
        min_block: smallest block area in patches.
        aspect_range: range of block aspect ratios, sampled log-uniformly.
        generator: optional torch generator for reproducibility.

    Returns:
        Boolean ``[N, h*w]``, True = removed.
    """
    h, w = grid_size
    length = h * w
    num_masked = length - num_kept(length, mask_ratio)
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    masks = []
    for _ in range(batch):
        grid = torch.zeros(h, w, dtype=torch.bool)
        for _attempt in range(100 * length):
            remaining = num_masked - int(grid.sum())
            if remaining <= 0:
                break
            u = torch.rand(3, generator=generator)
            area = min_block + float(u[0]) * (max(remaining, min_block) - min_block)
            aspect = math.exp(log_lo + float(u[1]) * (log_hi - log_lo))
            bh = max(1, min(h, round(math.sqrt(area * aspect))))
            bw = max(1, min(w, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            grid[top : top + bh, left : left + bw] = True
        masks.append(_fix_count(grid.flatten(), num_masked, generator))
    return torch.stack(masks)


def grid_mask(
    batch: int, grid_size: tuple[int, int], mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Regular grid masks (the paper's "grid-wise sampling": keep one patch in every ``s x s`` cell).

    The step ``s`` is ``round(sqrt(1 / (1 - ratio)))`` (2 for 75%); a random offset per sample varies which patch of
    each cell is kept. Counts are then made exact as in :func:`block_mask`, which only changes anything when the
    grid does not divide evenly.

    Returns:
        Boolean ``[N, h*w]``, True = removed.
    """
    h, w = grid_size
    length = h * w
    num_masked = length - num_kept(length, mask_ratio)
    step = max(1, round(math.sqrt(1 / (1 - mask_ratio))))
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    masks = []
    for _ in range(batch):
        dy, dx = (int(v) for v in torch.randint(0, step, (2,), generator=generator))
        keep = ((rows - dy) % step == 0) & ((cols - dx) % step == 0)
        masks.append(_fix_count((~keep).flatten(), num_masked, generator))
    return torch.stack(masks)


MASK_TYPES = ("random", "block", "grid")


def make_noise(
    mask_type: str,
    batch: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Sort keys for :func:`random_masking` realising ``mask_type``; ``None`` for plain random masking."""
    if mask_type == "random":
        return None
    if mask_type == "block":
        mask = block_mask(batch, grid_size, mask_ratio, generator=generator)
    elif mask_type == "grid":
        mask = grid_mask(batch, grid_size, mask_ratio, generator=generator)
    else:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    return mask_to_noise(mask, generator).to(device)
