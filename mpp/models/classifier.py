"""A classifier on a pretrained ViT encoder, pooled as the official MAE's fine-tuning and linear-probe models.

``global_pool="token"``: the cls token after the encoder's final ``norm``. ``global_pool="avg"``: the mean of the
patch tokens straight out of the blocks, then a fresh LayerNorm ``fc_norm``; the encoder's ``norm`` is dropped
(replaced by an identity), as the official ``models_vit`` deletes it. ``global_pool="tokens"``: no pooling at all, every
patch token after the encoder's final ``norm``, flattened in grid order (``L x D`` features). Pooling throws away where
things are, which a small image's classes largely depend on; the flattened map is the encoder's counterpart of the
raw-pixel logistic regression (which sees every pixel in place), so a frozen readout is compared like with like. The
linear probe uses the same features with a parameter-free BatchNorm in front of its linear head (``head_bn=True``).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from mpp.models.vit import LayerNorm6, ViTEncoder

# How a classifier reads the encoder's tokens out (see the module docstring).
CLASSIFIER_POOLS = ("token", "avg", "tokens")

# Head initialisations of the official code: fine-tuning (main_finetune) and linear probing (main_linprobe).
FINETUNE_HEAD_STD = 2e-5
PROBE_HEAD_STD = 0.01


class ViTClassifier(nn.Module):
    """Encoder, pooling, optional parameter-free BatchNorm, linear head.

    Args:
        encoder: a :class:`ViTEncoder` (a full masked autoencoder works too; its decoder is unused).
        num_classes: outputs of the head.
        global_pool: ``"token"``, ``"avg"`` or ``"tokens"`` (every patch token, flattened); ``None`` keeps the
            encoder's own.
        head_init_std: std of the truncated-normal head weight (bias zero): 2e-5 to fine-tune, 0.01 to probe.
        head_bn: put ``BatchNorm1d(affine=False, eps=1e-6)`` before the linear head (the linear probe's).
        feature_blocks: pool the outputs of the last ``n`` blocks and concatenate them (``n x D`` features), as
            DINO's and BEiT's linear evaluations do with the last 4; each block's pooled feature gets the same
            normalisation as the last one's (``fc_norm`` for ``avg``, the encoder's final norm for ``token``). For the
            frozen protocols; fine-tuning uses 1.

    Shapes: ``forward_features``: ``[N, C, H, W] -> [N, feature_blocks x D]`` (``tokens``: ``feature_blocks x L x D``);
    ``forward``: ``[N, C, H, W] -> [N, num_classes]``.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        global_pool: str | None = None,
        head_init_std: float = FINETUNE_HEAD_STD,
        head_bn: bool = False,
        feature_blocks: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        pool = global_pool or encoder.global_pool
        if pool not in CLASSIFIER_POOLS:
            raise ValueError(f"global_pool must be one of {CLASSIFIER_POOLS}, got {pool!r}")
        if pool == "token" and encoder.cls_token is None:
            raise ValueError("global_pool='token' needs an encoder with a cls token; use global_pool='avg'")
        if not 1 <= feature_blocks <= len(encoder.blocks):
            raise ValueError(
                f"feature_blocks must be in [1, {len(encoder.blocks)}] (the encoder's blocks), got {feature_blocks}"
            )
        self.encoder = encoder
        self.global_pool = pool
        self.num_classes = num_classes
        self.feature_blocks = feature_blocks
        per_block = encoder.embed_dim * (encoder.num_patches if pool == "tokens" else 1)
        self.embed_dim = per_block * feature_blocks
        if pool == "avg":
            encoder.norm = nn.Identity()
            self.fc_norm: nn.Module = LayerNorm6(encoder.embed_dim)  # per block: shared by all feature_blocks
        else:
            self.fc_norm = nn.Identity()
        linear = nn.Linear(self.embed_dim, num_classes)
        trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        bn = nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Sequential(bn, linear) if head_bn else linear

    @property
    def depth(self) -> int:
        """Number of transformer blocks (layer-wise lr decay counts ``depth + 1`` layers)."""
        return len(self.encoder.blocks)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled features: ``[N, C, H, W] -> [N, feature_blocks x D]`` (``tokens``: ``feature_blocks x L x D``)."""
        if self.feature_blocks == 1:
            tokens = self.encoder.forward_features(imgs)  # final norm applied in token mode, identity in avg mode
            return self.pool_block(tokens, last=True)
        x = self.encoder.prepend_cls(self.encoder.embed_patches(imgs))
        pooled = []
        first_kept = len(self.encoder.blocks) - self.feature_blocks
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i >= first_kept:
                pooled.append(self.pool_block(x, last=False))
        return torch.cat(pooled, dim=1)

    def pool_block(self, tokens: torch.Tensor, last: bool) -> torch.Tensor:
        """One block's feature ``[N, T, D] -> [N, D]`` (``tokens``: ``[N, L x D]``); ``last``: encoder norm applied."""
        if self.global_pool == "avg":
            return self.fc_norm(tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1))
        if self.global_pool == "tokens":
            patches = tokens[:, self.encoder.num_prefix_tokens :]
            return (patches if last else self.encoder.norm(patches)).flatten(1)
        return tokens[:, 0] if last else self.encoder.norm(tokens[:, 0])  # token mode keeps the encoder's norm

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Class logits: ``[N, C, H, W] -> [N, num_classes]``."""
        return self.head(self.forward_features(imgs))
