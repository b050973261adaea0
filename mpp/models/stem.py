"""A convolutional patch stem that never looks across patches: the ViT paper's hybrid idea, safe under masking.

The hybrid ViT lets a CNN cut the image into tokens, which gives the transformer a convolution's locality. Under MAE
masking an ordinary CNN would leak: a visible token's receptive field would cover masked pixels. Here every
convolution runs inside one patch (the patches are cut first, each padded with zeros at its own border) and the
normalisation is per patch (GroupNorm), so a token is a function of its own patch's pixels only. Shapes follow timm's
``PatchEmbed``: ``[N, C, H, W] -> [N, L, D]`` in row-major grid order.
"""

from __future__ import annotations

import torch
from timm.layers import to_2tuple
from torch import nn

STEMS = ("linear", "conv")


class PatchConvStem(nn.Module):
    """Per-patch convolutions, then a linear map of the patch's feature map to the token width.

    Args:
        img_size: input side or ``(H, W)``.
        patch_size: square patch side ``p``.
        in_chans: image channels ``C``.
        embed_dim: token width ``D``.
        width: channels of the two 3x3 convolutions.
    """

    def __init__(
        self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, width: int = 32
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.set_size(to_2tuple(img_size))
        self.convs = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.GroupNorm(1, width),  # statistics of one patch: never of its neighbours
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(1, width),
            nn.GELU(),
        )
        self.proj = nn.Linear(width * patch_size * patch_size, embed_dim)

    def set_size(self, img_size: tuple[int, int]) -> None:
        """Another input size: the grid follows (the weights work on patches, at any size)."""
        p = self.patch_size[0]
        self.img_size = img_size
        self.grid_size = (img_size[0] // p, img_size[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Tokens: ``[N, C, H, W] -> [N, L, D]``."""
        n, c, h, w = imgs.shape
        p = self.patch_size[0]
        gh, gw = h // p, w // p
        patches = imgs.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n * gh * gw, c, p, p)
        feats = self.convs(patches)  # [N*L, width, p, p]: zero padding at each patch's own border
        return self.proj(feats.flatten(1)).view(n, gh * gw, -1)
