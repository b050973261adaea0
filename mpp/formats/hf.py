"""Key mapping between mpp (official MAE names) and Hugging Face ``ViTMAEForPreTraining``.

Two Hugging Face layouts exist: transformers 4.x (``encoder.layer.{i}.attention.attention.query``, ...) and 5.x
(``layers.{i}.attention.q_proj``, ...). :func:`mpp_to_hf` defaults to the layout of the installed transformers (for
``load_state_dict`` in memory); :func:`save_hf` writes files in the 4.x layout, the one on the Hub, which transformers
5 converts when loading (and itself writes by default). Import reads either. mpp's fused ``qkv`` projection is split
into q, k, v on the way out and concatenated on the way in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mpp.runtime import read_json

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
    """``ViTMAEConfig`` arguments describing an mpp :class:`~mpp.models.mae.MaskedAutoencoder`.

    A bare :class:`~mpp.models.vit.ViTEncoder` is described too (for ``ViTMAEModel``); its decoder fields are the
    paper's defaults, which ``ViTMAEModel`` ignores.
    """
    if model.img_size[0] != model.img_size[1]:
        raise ValueError(f"Hugging Face ViTMAE needs square images, model has {model.img_size}")
    encoder = hf_config_kwargs_encoder(model)
    if getattr(model, "decoder_blocks", None) is None:
        return {**encoder, **_PAPER_HF_DECODER}
    dec = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    return {
        **encoder,
        "decoder_hidden_size": model.decoder_embed_dim,
        "decoder_num_hidden_layers": len(model.decoder_blocks),
        "decoder_num_attention_heads": dec.attn.num_heads if dec else 1,
        "decoder_intermediate_size": dec.mlp.fc1.out_features if dec else 4 * model.decoder_embed_dim,
        "mask_ratio": model.mask_ratio,
        "norm_pix_loss": model.norm_pix_loss,
    }


# ---------------------------------------------------------------------------------------------- files and configs
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_PAPER_HF_DECODER = {
    "decoder_hidden_size": 512, "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16,
    "decoder_intermediate_size": 2048, "mask_ratio": 0.75, "norm_pix_loss": False,
}  # fmt: skip


def hf_config_kwargs_encoder(model: Any) -> dict[str, Any]:
    """The encoder part of ``ViTMAEConfig`` for an mpp encoder (which must have a cls token: HF ViTMAE always does)."""
    if model.cls_token is None:
        raise ValueError(
            "Hugging Face ViTMAE always has a cls token; this encoder has none (export it to timm instead)"
        )
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
    }


def is_hf_state(state: dict[str, Any]) -> bool:
    """Whether a state dict uses Hugging Face ViTMAE names (either layout, with or without the ``vit.`` prefix)."""
    return any(k.startswith(("vit.", "embeddings.", "decoder.decoder_")) for k in state)


def hf_model_kwargs(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The mpp constructor arguments from a ``ViTMAEConfig`` dict (``config.json``).

    Returns:
        ``(kwargs, notes)``; decoder arguments are included, the caller drops them for an encoder-only checkpoint.
    """
    notes: list[str] = []
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}, not 'vit_mae'")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r} is not supported: mpp's ViT uses exact GELU ('gelu')")
    if not config.get("qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported: mpp's ViT has q, k, v biases")
    dim = config.get("hidden_size", 768)
    mlp_ratio = config.get("intermediate_size", 3072) / dim
    dec_dim = config.get("decoder_hidden_size", 512)
    dec_ratio = config.get("decoder_intermediate_size", 2048) / dec_dim
    if dec_ratio != mlp_ratio:
        notes.append(f"decoder MLP ratio {dec_ratio} differs from the encoder's {mlp_ratio}; the decoder cannot load")
    eps = config.get("layer_norm_eps", 1e-12)
    if eps != 1e-6:
        notes.append(
            f"layer_norm_eps {eps:g} in config.json; mpp uses the official MAE's 1e-6 (a ~1e-6 relative difference)"
        )
    size = config.get("image_size", 224)
    kwargs = {
        "img_size": [size, size] if isinstance(size, int) else list(size),
        "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3),
        "embed_dim": dim,
        "depth": config.get("num_hidden_layers", 12),
        "num_heads": config.get("num_attention_heads", 12),
        "mlp_ratio": mlp_ratio,
        "decoder_embed_dim": dec_dim,
        "decoder_depth": config.get("decoder_num_hidden_layers", 8),
        "decoder_num_heads": config.get("decoder_num_attention_heads", 16),
        "mask_ratio": config.get("mask_ratio", 0.75),
        "norm_pix_loss": bool(config.get("norm_pix_loss", False)),
    }
    return kwargs, notes


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``from_pretrained`` directory: ``model.safetensors``, ``pytorch_model.bin`` or their shards."""
    from mpp.formats.safe_load import read_weights_file

    for name in HF_WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_weights_file(directory / shard)[0])
            return state
        return read_weights_file(path)[0]
    raise FileNotFoundError(f"{directory}: no Hugging Face weights ({', '.join(HF_WEIGHT_FILES)})")


def read_hf_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], list[str]]:
    """Read a ``ViTMAEForPreTraining``/``ViTMAEModel`` directory (``config.json`` + weights).

    Returns:
        ``(mpp-named state, mpp constructor kwargs, metadata (mean/std/norm_pix_loss), notes)``.
    """
    directory = Path(directory)
    config = read_json(directory / "config.json")
    kwargs, notes = hf_model_kwargs(config)
    state = hf_to_mpp(read_hf_weights(directory))
    meta: dict[str, Any] = {"norm_pix_loss": kwargs["norm_pix_loss"]}
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        pre = json.loads(processor.read_text())
        if "image_mean" in pre and "image_std" in pre:
            meta.update(mean=list(pre["image_mean"]), std=list(pre["image_std"]))
    return state, kwargs, meta, notes


def to_hf(model: Any, layout: str = "v4") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, config.json dict)`` of the Hugging Face twin of an mpp model.

    A masked autoencoder maps to ``ViTMAEForPreTraining``, a bare encoder to ``ViTMAEModel`` (keys without ``vit.``).
    """
    full = getattr(model, "decoder_blocks", None) is not None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    hf_state = mpp_to_hf(state, layout=layout)
    if not full:  # ViTMAEModel keys have no "vit." prefix
        hf_state = {k[len("vit.") :]: v for k, v in hf_state.items()}
    config = {
        "architectures": ["ViTMAEForPreTraining" if full else "ViTMAEModel"],
        "model_type": "vit_mae",
        **hf_config_kwargs(model),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }
    return hf_state, config


def save_hf(
    model: Any,
    dst: str | Path,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    layout: str = "v4",
) -> list[Path]:
    """Write a directory that ``transformers`` loads with ``from_pretrained`` (transformers is not needed to write it).

    A masked autoencoder becomes ``ViTMAEForPreTraining`` (same loss as mpp for the same weights and ``noise``); a
    bare encoder becomes ``ViTMAEModel``.

    Args:
        model: mpp model.
        dst: output directory (``config.json``, ``model.safetensors``, and ``preprocessor_config.json`` when
            ``mean``/``std`` are given).
        mean: per-channel normalisation mean (optional).
        std: per-channel normalisation std (optional).
        layout: key layout; ``"v4"`` (the default) is what the Hub holds and both transformers 4 and 5 load.

    Returns:
        The files written.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hf_state, config = to_hf(model, layout)
    written = [dst / "config.json", dst / "model.safetensors"]
    written[0].write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state, str(written[1]), metadata={"format": "pt"})
    if mean is not None and std is not None:
        processor = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": model.img_size[0], "width": model.img_size[1]},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(mean),
            "image_std": list(std),
        }
        written.append(dst / "preprocessor_config.json")
        written[-1].write_text(json.dumps(processor, indent=2) + "\n")
    return written
