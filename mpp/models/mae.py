"""Masked autoencoder (He et al. 2021): a ViT encoder on visible patches and a light pixel decoder.

Stages follow the paper and the official code: ``forward_encoder`` (embed, add positions, mask, cls, blocks),
``forward_decoder`` (project, insert mask tokens, unshuffle, add decoder positions, blocks, predict pixels) and
``forward_loss`` (MSE on masked patches only, optionally against per-patch normalised pixels).
Parameter names equal the official ``models_mae.py``, so its ``*_full.pth`` checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mpp.masking import MASK_TYPES, make_noise, num_kept, patchify, random_masking, unpatchify
from mpp.models.vit import LayerNorm6, ViTEncoder
from mpp.pos_embed import sincos_2d

NORM_PIX_EPS = 1e-6


@dataclass
class MAEOutput:
    """Result of a forward pass.

    Attributes:
        loss: scalar MSE over masked patches.
        pred: ``[N, L, p*p*C]`` predicted patches (normalised per patch when ``norm_pix_loss``).
        mask: ``[N, L]``, 1 = removed.
        ids_restore: ``[N, L]`` indices that undo the masking shuffle.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def normalize_patches(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch normalisation of the norm-pix target: ``(x - mean) / sqrt(var + 1e-6)``, unbiased variance.

    Returns:
        ``(normalised, mean [N, L, 1], std [N, L, 1])``; ``std`` lets predictions be mapped back to pixels.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
    std = (var + NORM_PIX_EPS) ** 0.5
    return (target - mean) / std, mean, std


def visible_patch_stats(
    imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, grid_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std as an observer of the visible patches alone can know them.

    Visible patches keep their own statistics; each hidden patch gets the inverse-squared-distance weighted average
    of the visible patches' (grid distance between patch centres), so nothing of the hidden truth leaks into a
    norm-pix reconstruction mapped back to pixels.

    Args:
        imgs: ``[N, C, H, W]``.
        mask: ``[N, L]``, 1 = removed; at least one patch per image must be visible.
        patch_size: patch side.
        grid_size: ``(h, w)``.

    Returns:
        ``(mean, std)``, each ``[N, L, 1]``.
    """
    _, mean, std = normalize_patches(patchify(imgs, patch_size))
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float().to(imgs.device)
    weight = 1.0 / torch.cdist(centres, centres).pow(2).fill_diagonal_(float("inf"))  # [L, L], 0 on the diagonal
    weight = weight.unsqueeze(0) * (1 - mask.float()).unsqueeze(1)  # only visible patches vote: [N, L, L]
    total = weight.sum(dim=-1, keepdim=True)
    if bool((total[mask.bool()] == 0).any()):
        raise ValueError("every patch is masked: no visible patch to estimate statistics from")
    hidden = mask.bool().unsqueeze(-1)
    est_mean = (weight @ mean) / total.clamp_min(1e-12)
    est_std = (weight @ std) / total.clamp_min(1e-12)
    return torch.where(hidden, est_mean, mean), torch.where(hidden, est_std, std)


class MaskedAutoencoder(ViTEncoder):
    """MAE with a ViT encoder (inherited, so encoder keys sit at the top level as in the official model).

    Args:
        decoder_embed_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        norm_pix_loss: reconstruct per-patch normalised pixels (the paper's default for its best results).
        mask_ratio: default fraction of patches removed.
        mask_type: ``"random"`` (the paper), ``"block"`` or ``"grid"`` (its masking ablation).
        **encoder_kwargs: passed to :class:`ViTEncoder`.
    """

    def __init__(
        self,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        mask_type: str = "random",
        **encoder_kwargs,
    ) -> None:
        encoder_kwargs.setdefault("class_token", True)
        super().__init__(**encoder_kwargs)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        mlp_ratio = encoder_kwargs.get("mlp_ratio", 4.0)
        self.decoder_embed_dim = decoder_embed_dim
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type

        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.num_patches, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm6(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim(self.patch_size, self.in_chans), bias=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation for encoder and decoder."""
        self.init_encoder_weights()
        table = sincos_2d(self.decoder_embed_dim, self.grid_size, self.num_prefix_tokens)
        self.decoder_pos_embed.data.copy_(table.unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self.init_linear_and_norm)

    # ------------------------------------------------------------------------------------------- stages
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Args:
            imgs: ``[N, C, H, W]``.
            mask_ratio: fraction of patches removed.
            noise: optional ``[N, L]`` sort keys fixing the mask.

        Returns:
            ``(latent [N, prefix + len_keep, D], mask [N, L], ids_restore [N, L])``.
        """
        x = self.embed_patches(imgs)  # positions are added before masking
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        latent = self.run_blocks(self.prepend_cls(x))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from the visible-token latent.

        Args:
            latent: ``[N, prefix + len_keep, D]``.
            ids_restore: ``[N, L]``.

        Returns:
            ``[N, L, p*p*C]`` predictions in grid order.
        """
        x = self.decoder_embed(latent)  # [N, prefix + len_keep, Dd]
        prefix = self.num_prefix_tokens
        n, length = ids_restore.shape
        visible = x[:, prefix:, :]
        mask_tokens = self.mask_token.expand(n, length - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)  # shuffled order: kept first, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # back to grid order
        x = torch.cat([x[:, :prefix, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, prefix:, :]

    def target_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """The reconstruction target ``[N, L, p*p*C]``: pixels, or per-patch normalised pixels."""
        target = patchify(imgs, self.patch_size)
        return normalize_patches(target)[0] if self.norm_pix_loss else target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only.

        Args:
            imgs: ``[N, C, H, W]``.
            pred: ``[N, L, p*p*C]``.
            mask: ``[N, L]``, 1 = removed.
        """
        target = self.target_patches(imgs)
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch.

        Args:
            imgs: ``[N, C, H, W]``.
            mask_ratio: fraction removed (defaults to the model's ``mask_ratio``).
            noise: ``[N, L]`` sort keys for a reproducible mask; when ``None`` the model's ``mask_type`` draws one.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None:
            noise = make_noise(self.mask_type, imgs.shape[0], self.grid_size, ratio, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)

    # ------------------------------------------------------------------------------------------- display
    def pred_to_pixels(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions as images ``[N, C, H, W]`` in the input's scale.

        Norm-pix predictions are only shapes (zero mean, unit std per patch) and look like noise until mapped back
        with a mean and std per patch. Without ``mask`` every patch uses its own true statistics (what the official
        visualisation does: a hidden patch's brightness and contrast then come from the hidden truth); with ``mask``
        hidden patches use statistics estimated from the visible ones (:func:`visible_patch_stats`), so the picture
        shows only what the model and the visible patches know. Only the masked patches are real reconstructions.
        """
        if self.norm_pix_loss:
            if mask is None:
                _, mean, std = normalize_patches(patchify(imgs, self.patch_size))
            else:
                mean, std = visible_patch_stats(imgs, mask, self.patch_size, self.grid_size)
            pred = pred * std + mean
        return unpatchify(pred, self.patch_size, self.grid_size, self.in_chans)

    def set_grid(self, img_size: int | tuple[int, int], patch_size: int | None = None) -> None:
        """Move encoder and decoder to another input size: the decoder's fixed sin-cos table is recomputed too.

        Reconstructing at a new patch size would need a new pixel head, so only the input size may change here.
        """
        if patch_size not in (None, self.patch_size):
            raise ValueError(f"a masked autoencoder keeps its patch size {self.patch_size}; got {patch_size}")
        super().set_grid(img_size)
        table = sincos_2d(self.decoder_embed_dim, self.grid_size, self.num_prefix_tokens).unsqueeze(0)
        self.decoder_pos_embed = nn.Parameter(table.to(self.decoder_pos_embed), requires_grad=False)

    @property
    def visible_tokens(self) -> int:
        """Tokens the encoder sees per image while pretraining: the kept patches and the cls token."""
        return num_kept(self.num_patches, self.mask_ratio) + self.num_prefix_tokens

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder-only weights (no decoder keys), as the official ``mae_pretrain_vit_*`` files."""
        return {k: v for k, v in self.state_dict().items() if not _is_decoder_key(k)}


def patch_dim(patch_size: int, in_chans: int) -> int:
    """Values per flattened patch: ``p*p*C``."""
    return patch_size * patch_size * in_chans


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder") or key == "mask_token"
