"""ViT encoder built from timm layers, with parameter names equal to the official MAE/timm ViT.

The encoder is used both inside :class:`mpp.models.mae.MaskedAutoencoder` (which sees only visible patches) and on its
own for probes and fine-tuning (``forward_features`` on whole images, tokens in grid order).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mpp.models.stem import STEMS, PatchConvStem
from mpp.pos_embed import resize_pos_embed, sincos_2d

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
POOLS = ("token", "avg")
POS_EMBEDS = ("sincos", "learned")


class ViTEncoder(nn.Module):
    """Vision Transformer encoder: patch embed, optional cls token, position table, blocks, final norm.

    Args:
        img_size: input side or ``(H, W)``.
        patch_size: square patch side.
        in_chans: image channels (1 grayscale, 3 RGB, 4+ multispectral).
        embed_dim: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D``.
        class_token: prepend a learnable cls token.
        global_pool: ``"token"`` (cls token) or ``"avg"`` (mean of patch tokens) for :meth:`pool`.
        pos_embed: ``"sincos"`` (fixed 2D table, the MAE default) or ``"learned"`` (1D table, trained).
        drop_path_rate: stochastic depth at the last block (linearly increasing from 0).
        stem: ``"linear"`` (the paper's patch projection, timm's ``PatchEmbed``) or ``"conv"`` (per-patch
            convolutions, :class:`mpp.models.stem.PatchConvStem`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_token: bool = True,
        global_pool: str = "token",
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        stem: str = "linear",
    ) -> None:
        super().__init__()
        # Constructor arguments, saved with exported weights so the encoder can be rebuilt without its code path.
        self.encoder_config = {
            "img_size": list(to_2tuple(img_size)),
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "class_token": class_token,
            "global_pool": global_pool,
            "pos_embed": pos_embed,
        }
        if stem != "linear":  # recorded only when used: files of the paper's linear stem stay as they were
            self.encoder_config["stem"] = stem
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a cls token")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.num_prefix_tokens = 1 if class_token else 0

        self.stem = stem
        if stem == "conv":
            self.patch_embed: nn.Module = PatchConvStem(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # The sin-cos table is a frozen parameter (not a buffer) so state-dict keys match the official checkpoints.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim), requires_grad=pos_embed == "learned"
        )
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # as torch.linspace(0, rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=LayerNorm6)
            for i in range(depth)
        )
        self.norm = LayerNorm6(embed_dim)

    # ----------------------------------------------------------------------------------------------- init
    def init_encoder_weights(self) -> None:
        """Official MAE init: fixed sin-cos table, xavier patch embed, N(0, .02) tokens, xavier Linear, unit LN."""
        if self.pos_embed_type == "sincos":
            table = sincos_2d(self.embed_dim, self.grid_size, self.num_prefix_tokens)
            self.pos_embed.data.copy_(table.unsqueeze(0))
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        # Patch embed is a conv (or the conv stem's Linear) initialised like a Linear over the flattened patch.
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def init_linear_and_norm(module: nn.Module) -> None:
        """Xavier-uniform Linear weights with zero bias; LayerNorm weight 1, bias 0 (apply with ``Module.apply``)."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------- stages
    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding added (cls excluded): ``[N, C, H, W] -> [N, L, D]``."""
        x = self.patch_embed(imgs)
        return x + self.pos_embed[:, self.num_prefix_tokens :, :]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Add the cls token (with its position row) in front: ``[N, L', D] -> [N, 1+L', D]``; no-op without one."""
        if self.cls_token is None:
            return x
        cls = self.cls_token + self.pos_embed[:, :1, :]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer blocks then the final norm: ``[N, T, D] -> [N, T, D]``."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens of unmasked images, in grid order: ``[N, C, H, W] -> [N, prefix + L, D]``."""
        return self.run_blocks(self.prepend_cls(self.embed_patches(imgs)))

    def pool(self, tokens: torch.Tensor, global_pool: str | None = None) -> torch.Tensor:
        """Pooled embedding: the cls token or the mean of patch tokens: ``[N, T, D] -> [N, D]``."""
        how = global_pool or self.global_pool
        if how == "token":
            if self.cls_token is None:
                raise ValueError("global_pool='token' needs a cls token")
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of whole images: ``[N, C, H, W] -> [N, D]`` (what probes and kNN use)."""
        return self.pool(self.forward_features(imgs))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled embedding of whole images: ``[N, C, H, W] -> [N, D]``."""
        return self.embed(imgs)

    # ------------------------------------------------------------------------------------------- resize
    def set_grid(self, img_size: int | tuple[int, int], patch_size: int | None = None) -> None:
        """Move the encoder to another input size (and optionally patch size), resizing the position table.

        A sin-cos table is recomputed exactly; a learned one is resized by 2D bicubic interpolation. A new patch size
        resizes the patch-embed kernel with timm's ``resample_patch_embed``.
        """
        from timm.layers import resample_patch_embed

        img_size = to_2tuple(img_size)
        patch_size = patch_size or self.patch_size
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        new_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if patch_size != self.patch_size and self.stem == "conv":
            raise ValueError(f"stem=conv keeps its patch size {self.patch_size}; another patch size needs stem=linear")
        if patch_size != self.patch_size:
            old = self.patch_embed.proj
            new = nn.Conv2d(self.in_chans, self.embed_dim, patch_size, patch_size)
            new.weight.data.copy_(resample_patch_embed(old.weight.data, [patch_size, patch_size]))
            new.bias.data.copy_(old.bias.data)
            self.patch_embed.proj = new
            self.patch_embed.patch_size = (patch_size, patch_size)
            self.patch_size = patch_size
        if self.pos_embed_type == "sincos":
            table = sincos_2d(self.embed_dim, new_grid, self.num_prefix_tokens).unsqueeze(0)
        else:
            table = resize_pos_embed(self.pos_embed.data, self.grid_size, new_grid, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        if isinstance(self.patch_embed, PatchConvStem):
            self.patch_embed.set_size(img_size)
        else:
            self.patch_embed.img_size = img_size
            self.patch_embed.grid_size = new_grid
            self.patch_embed.num_patches = new_grid[0] * new_grid[1]
        self.img_size = img_size
        self.grid_size = new_grid
        self.num_patches = new_grid[0] * new_grid[1]
        self.encoder_config.update(img_size=list(img_size), patch_size=patch_size)
