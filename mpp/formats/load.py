"""Building mpp models from checkpoints of any format, and loading weights with clear shape errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import to_2tuple
from torch import nn

from mpp.formats.detect import Source, read_source
from mpp.formats.official import infer_config
from mpp.models.mae import MaskedAutoencoder, _is_decoder_key
from mpp.models.registry import MODEL_CONFIGS
from mpp.models.vit import ViTEncoder
from mpp.pos_embed import sincos_2d

# Constructor arguments that belong to the decoder and the pretraining loss, not to the encoder.
DECODER_ARGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio", "mask_type")
# The official MAE (and timm's MAE weights) normalise RGB input with the ImageNet statistics.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ShapeMismatchError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` read.

    Attributes:
        format: source format (``mpp``, ``official``, ``timm``, ``hf``).
        path: the file or directory.
        config: constructor arguments of the returned model.
        has_decoder: whether the model is a full :class:`~mpp.models.mae.MaskedAutoencoder`.
        metadata: ``mean``, ``std``, ``norm_pix_loss``, ``variant`` when known (what an mpp export records).
        notes: what was adapted or assumed on the way (heads assumed, head dropped, ...).
    """

    format: str
    path: str
    config: dict[str, Any]
    has_decoder: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` that names every shape mismatch (key and both shapes) and missing/unexpected keys.

    Args:
        model: destination.
        state: tensors with the model's names.
        strict: refuse missing or unexpected keys (shape mismatches are always refused).
        source: name of the checkpoint for messages.

    Returns:
        ``(missing, unexpected)`` keys (empty when ``strict``).

    Raises:
        ShapeMismatchError: a tensor's shape differs from the model's.
        ValueError: with ``strict``, keys missing from or unknown to the model.
    """
    own = model.state_dict()
    mismatched = [
        f"{k}: {source} has {list(v.shape)}, model expects {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        hint = ""
        if any(m.startswith(("pos_embed:", "decoder_pos_embed:")) for m in mismatched):
            hint = " (another image or patch size? build the model at the checkpoint's size, then call set_grid)"
        raise ShapeMismatchError(f"shape mismatch for {'; '.join(mismatched)}{hint}")
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not fit the model: missing {_shorten(missing)}; unexpected {_shorten(unexpected)}"
        )
    model.load_state_dict(state, strict=False)
    return missing, unexpected


def _shorten(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def build_model(config: dict[str, Any], has_decoder: bool) -> ViTEncoder:
    """A :class:`~mpp.models.mae.MaskedAutoencoder` (``has_decoder``) or a :class:`~mpp.models.vit.ViTEncoder`."""
    for dim_key, heads_key in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if has_decoder or dim_key == "embed_dim":
            dim, heads = config.get(dim_key), config.get(heads_key)
            if dim and heads and dim % heads:
                raise ValueError(f"{heads_key}={heads} does not divide {dim_key}={dim}")
    if has_decoder:
        return MaskedAutoencoder(**config)
    return ViTEncoder(**{k: v for k, v in config.items() if k not in DECODER_ARGS})


def guess_variant(config: dict[str, Any]) -> str | None:
    """The registered variant whose architecture ``config`` has, if any (e.g. ``mae_vit_base_patch16``)."""
    defaults = {"img_size": 224, "in_chans": 3, "mlp_ratio": 4.0}
    for name, variant in MODEL_CONFIGS.items():
        wanted = {**defaults, **variant}
        wanted["img_size"] = list(to_2tuple(wanted["img_size"]))
        if all(_as_list(config[k]) == v for k, v in wanted.items() if k in config):
            return name
    return None


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _fill_fixed_tables(state: dict[str, torch.Tensor], model: ViTEncoder, notes: list[str]) -> None:
    """Add sin-cos tables a checkpoint left out (they are fixed functions of the grid, not learned)."""
    if "pos_embed" not in state and model.pos_embed_type == "sincos":
        state["pos_embed"] = sincos_2d(model.embed_dim, model.grid_size, model.num_prefix_tokens).unsqueeze(0)
        notes.append("pos_embed absent: the fixed sin-cos table was computed")
    if isinstance(model, MaskedAutoencoder) and "decoder_pos_embed" not in state:
        table = sincos_2d(model.decoder_embed_dim, model.grid_size, model.num_prefix_tokens)
        state["decoder_pos_embed"] = table.unsqueeze(0)
        notes.append("decoder_pos_embed absent: the fixed sin-cos table was computed")


def _split_decoder(source: Source, encoder_only: bool) -> bool:
    """Whether the model gets a decoder; drops decoder tensors when it does not."""
    has_decoder = "decoder_embed.weight" in source.state
    if has_decoder and encoder_only:
        source.state = {k: v for k, v in source.state.items() if not _is_decoder_key(k)}
        source.notes.append("decoder dropped (encoder only)")
        has_decoder = False
    return has_decoder


def load_checkpoint(
    path: str | Path, *, fmt: str | None = None, encoder_only: bool = False, **overrides: Any
) -> tuple[ViTEncoder, CheckpointInfo]:
    """Build an mpp model from a checkpoint of any supported format.

    The result is a :class:`~mpp.models.mae.MaskedAutoencoder` when the checkpoint has a decoder (official ``*_full``
    and ``mae_visualize_*`` files, ``ViTMAEForPreTraining``, mpp ``mae.safetensors``), otherwise a
    :class:`~mpp.models.vit.ViTEncoder`. Files without a stored config have their architecture read off tensor
    shapes; the attention heads, invisible there, follow the standard ViT table unless given.

    Args:
        path: file or directory (see :mod:`mpp.formats.detect` for the formats).
        fmt: force a format (``mpp``, ``official``, ``timm``, ``hf``) instead of detecting it.
        encoder_only: drop the decoder and return an encoder.
        **overrides: constructor arguments that win over the stored or inferred ones, e.g. ``num_heads``,
            ``decoder_num_heads``, ``norm_pix_loss``, ``global_pool``, ``img_size`` (for non-square grids: the size
            the weights were trained at; change resolution afterwards with ``model.set_grid``).

    Returns:
        ``(model, info)``.

    Raises:
        ShapeMismatchError: an override contradicts the tensors (message names the key and both shapes).
        ValueError: unsupported layout, or a pickle that would run code.
    """
    source = read_source(path, fmt, encoder_only=encoder_only)
    has_decoder = _split_decoder(source, encoder_only)
    if source.config is not None:
        config = {**source.config, **overrides}
    else:
        config, inferred = infer_config(source.state, str(path), {**source.hints, **overrides})
        source.notes.extend(inferred)
        if has_decoder and "norm_pix_loss" not in config:
            source.notes.append("norm_pix_loss is not stored in the file: False assumed; set it if pretrained with it")
    if not has_decoder:
        config = {k: v for k, v in config.items() if k not in DECODER_ARGS}
    model = build_model(config, has_decoder)
    _fill_fixed_tables(source.state, model, source.notes)
    load_state_dict_checked(model, source.state, source=str(path))
    metadata = dict(source.metadata)
    if "mean" not in metadata and source.format != "mpp" and model.in_chans == 3:
        metadata.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        source.notes.append("normalisation assumed to be ImageNet mean/std (the official MAE's)")
    if has_decoder:
        metadata["norm_pix_loss"] = model.norm_pix_loss
    metadata.setdefault("variant", guess_variant(config))
    info = CheckpointInfo(source.format, str(path), config, has_decoder, metadata, source.notes)
    return model, info


def load_weights(model: ViTEncoder, path: str | Path, *, fmt: str | None = None, strict: bool = True) -> list[str]:
    """Load a checkpoint of any supported format into an existing mpp model.

    An encoder takes the encoder part of a full checkpoint; a masked autoencoder needs the decoder too when
    ``strict``.

    Returns:
        Notes on what was adapted.

    Raises:
        ShapeMismatchError: naming the key and both shapes.
        ValueError: missing or unexpected keys (``strict``), unsupported layout, or a pickle that would run code.
    """
    source = read_source(path, fmt)
    _split_decoder(source, encoder_only=not isinstance(model, MaskedAutoencoder))
    load_state_dict_checked(model, source.state, strict=strict, source=str(path))
    return source.notes
