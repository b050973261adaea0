"""Position embeddings: fixed 2D sin-cos tables (as the official MAE), and resizing to a new patch grid.

The official table for a grid of ``h x w`` patches puts the sin-cos code of the *column* coordinate in the first half
of each vector and the *row* coordinate in the second half, and prepends an all-zero row for the cls token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1D sin-cos code: ``[sin(pos * omega_k) ..., cos(pos * omega_k) ...]`` with ``omega_k = 10000^(-k/(D/2))``.

    Args:
        embed_dim: output width ``D`` (even).
        positions: any shape ``[M...]``; flattened.

    Returns:
        ``[M, D]`` in float64 (cast by the caller) to match the official numpy tables exactly.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int] | int, num_extra_tokens: int = 0) -> torch.Tensor:
    """Fixed 2D sin-cos table for a ``h x w`` grid, row-major, with zero rows for extra (cls) tokens in front.

    Args:
        embed_dim: width ``D`` (divisible by 4).
        grid_size: ``(h, w)`` or an int for a square grid.
        num_extra_tokens: zero rows prepended (1 for a cls token).

    Returns:
        float32 ``[num_extra_tokens + h*w, D]``.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if num_extra_tokens:
        table = torch.cat([torch.zeros(num_extra_tokens, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_extra_tokens: int = 1,
) -> torch.Tensor:
    """Resize a position table to a new patch grid: 2D bicubic interpolation of the patch part, extra tokens kept.

    Used when fine-tuning at another resolution or patch size than pretraining.

    Args:
        pos_embed: ``[1, E + h*w, D]`` or ``[E + h*w, D]``.
        old_grid: ``(h, w)`` of the table.
        new_grid: ``(h', w')`` wanted.
        num_extra_tokens: leading rows (cls) copied unchanged.

    Returns:
        Table of the same rank with ``E + h'*w'`` rows.
    """
    squeeze = pos_embed.dim() == 2
    table = pos_embed.unsqueeze(0) if squeeze else pos_embed
    expected = num_extra_tokens + old_grid[0] * old_grid[1]
    if table.shape[1] != expected:
        raise ValueError(
            f"pos_embed has {table.shape[1]} rows but grid {old_grid[0]}x{old_grid[1]} with "
            f"{num_extra_tokens} extra tokens needs {expected}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    extra, patches = table[:, :num_extra_tokens], table[:, num_extra_tokens:]
    dim = table.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(table.dtype)
    out = torch.cat([extra, patches], dim=1)
    return out[0] if squeeze else out
