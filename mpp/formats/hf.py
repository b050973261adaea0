"""Key mapping between mpp (official MAE names) and Hugging Face ``ViTMAEForPreTraining``.

Two Hugging Face layouts exist: transformers 4.x (``encoder.layer.{i}.attention.attention.query``, ...) and 5.x
(``layers.{i}.attention.q_proj``, ...). Export writes the layout of the installed transformers; import reads either.
mpp's fused ``qkv`` projection is split into q, k, v on the way out and concatenated on the way in.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Per-block renames, (mpp suffix, HF v5 suffix, HF v4 suffix); qkv is handled separately.
_BLOCK_KEYS = [
    ("norm1", "layernorm_before", "layernorm_before"),
    ("norm2", "layernorm_after", "layernorm_after"),
    ("attn.proj", "attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "mlp.fc2", "output.dense"),
]
_QKV_V5 = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_QKV_V4 = ("attention.attention.query", "attention.attention.key", "attention.attention.value")

_TOP_KEYS = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


_HF_BLOCK_RE = re.compile(r"(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)")


def installed_layout() -> str:
    """``"v5"`` or ``"v4"``: the key layout of the installed transformers (``"v5"`` when it is absent)."""
    try:
        import transformers
    except ImportError:
        return "v5"
    return "v4" if int(transformers.__version__.split(".")[0]) < 5 else "v5"


def _block_prefixes(layout: str) -> tuple[str, str]:
    if layout == "v5":
        return "vit.layers.{i}.", "decoder.decoder_layers.{i}."
    return "vit.encoder.layer.{i}.", "decoder.decoder_layers.{i}."


def mpp_to_hf(state: dict[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Rename an mpp/official MAE state dict to Hugging Face ``ViTMAEForPreTraining`` keys.

    Args:
        state: mpp state dict (encoder-only is fine: decoder keys are simply absent).
        layout: ``"v5"`` or ``"v4"``; defaults to the installed transformers.
    """
    layout = layout or installed_layout()
    enc_prefix, dec_prefix = _block_prefixes(layout)
    qkv_names = _QKV_V5 if layout == "v5" else _QKV_V4
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        match = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if not match:
            raise KeyError(f"no Hugging Face name for mpp key {key!r}")
        group, index, module, kind = match.groups()
        prefix = (enc_prefix if group == "blocks" else dec_prefix).format(i=index)
        if module == "attn.qkv":
            for name, part in zip(qkv_names, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{name}.{kind}"] = part.clone()
            continue
        renamed = {m: (v5 if layout == "v5" else v4) for m, v5, v4 in _BLOCK_KEYS}
        if module not in renamed:
            raise KeyError(f"no Hugging Face name for mpp key {key!r}")
        out[f"{prefix}{renamed[module]}.{kind}"] = value
    return out


def hf_to_mpp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ViTMAE state dict (either layout; ``ViTMAEModel`` keys without ``vit.`` too) to mpp."""
    # ViTMAEModel checkpoints lack the "vit." prefix of ViTMAEForPreTraining.
    state = {(k if k.startswith(("vit.", "decoder.")) else f"vit.{k}"): v for k, v in state.items()}
    layout = "v4" if any(".encoder.layer." in k for k in state) else "v5"
    qkv_names = _QKV_V5 if layout == "v5" else _QKV_V4
    inverse_top = {hf: mpp for mpp, hf in _TOP_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
            continue
        match = re.fullmatch(
            r"(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)", key
        )
        if not match:
            raise KeyError(f"unexpected Hugging Face key {key!r}")
        group, index, module, kind = match.groups()
        target = "blocks" if group.startswith("vit") else "decoder_blocks"
        if module in qkv_names:
            pending_qkv.setdefault((f"{target}.{index}.attn.qkv", kind), {})[module] = value
            continue
        renamed = {(v5 if layout == "v5" else v4): m for m, v5, v4 in _BLOCK_KEYS}
        if module not in renamed:
            raise KeyError(f"unexpected Hugging Face key {key!r}")
        out[f"{target}.{index}.{renamed[module]}.{kind}"] = value
    for (name, kind), parts in pending_qkv.items():
        missing = [q for q in qkv_names if q not in parts]
        if missing:
            raise KeyError(f"{name}.{kind}: Hugging Face checkpoint lacks {missing}")
        out[f"{name}.{kind}"] = torch.cat([parts[q] for q in qkv_names], dim=0)
    return out


def hf_config_kwargs(model: Any) -> dict[str, Any]:
    """``ViTMAEConfig`` arguments describing an mpp :class:`~mpp.models.mae.MaskedAutoencoder`."""
    if model.img_size[0] != model.img_size[1]:
        raise ValueError(f"Hugging Face ViTMAE needs square images, model has {model.img_size}")
    dec = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    return {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.blocks[0].attn.num_heads,
        "intermediate_size": model.blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "image_size": model.img_size[0],
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "decoder_hidden_size": model.decoder_embed_dim,
        "decoder_num_hidden_layers": len(model.decoder_blocks),
        "decoder_num_attention_heads": dec.attn.num_heads if dec else 1,
        "decoder_intermediate_size": dec.mlp.fc1.out_features if dec else 4 * model.decoder_embed_dim,
        "mask_ratio": model.mask_ratio,
        "norm_pix_loss": model.norm_pix_loss,
    }
