"""Named model variants: each is a dict of constructor arguments, overridable by keyword.

The paper's variants (ViT-B/16, L/16, H/14 with a 512-d, 8-block, 16-head decoder) and small variants for CPUs and
small images (28x28 Fashion-MNIST, 32x32 CIFAR-like data).
"""

from __future__ import annotations

import difflib
from typing import Any

from mpp.models.mae import MaskedAutoencoder

PAPER_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's variants (224x224 RGB).
    "mae_vit_base_patch16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **PAPER_DECODER},
    "mae_vit_large_patch16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, **PAPER_DECODER},
    "mae_vit_huge_patch14": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **PAPER_DECODER},
    # ViT-S/16 at 224, a common smaller baseline.
    "mae_vit_small_patch16": {
        "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
        "decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8,
    },
    # CPU-sized variants for 28x28 grayscale (Fashion-MNIST): patch 4 gives a 7x7 grid.
    "mae_vit_tiny_patch4": {
        "img_size": 28, "in_chans": 1, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
        "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    "mae_vit_small_patch4": {
        "img_size": 28, "in_chans": 1, "patch_size": 4, "embed_dim": 384, "depth": 8, "num_heads": 6,
        "decoder_embed_dim": 192, "decoder_depth": 4, "decoder_num_heads": 6,
    },
    # 32x32 RGB (CIFAR-like), patch 4 gives an 8x8 grid.
    "mae_vit_tiny_patch4_32": {
        "img_size": 32, "in_chans": 3, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
        "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    # A very small model for tests and smoke runs.
    "mae_vit_micro_patch4": {
        "img_size": 28, "in_chans": 1, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
    },
}  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODEL_CONFIGS)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of variant ``name`` with ``overrides`` applied."""
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(list_models())}")
    return {**MODEL_CONFIGS[name], **overrides}


def create_model(name: str, **overrides: Any) -> MaskedAutoencoder:
    """Build a :class:`MaskedAutoencoder` variant by name.

    Example: ``create_model("mae_vit_base_patch16", norm_pix_loss=True)`` or
    ``create_model("mae_vit_tiny_patch4", img_size=32, in_chans=3)``.
    """
    return MaskedAutoencoder(**model_config(name, **overrides))
