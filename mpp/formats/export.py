"""Writing an mpp model in each target format: mpp safetensors, timm, Hugging Face."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpp.formats.hf import save_hf
from mpp.formats.native import save_encoder, save_mae
from mpp.formats.timm import save_timm
from mpp.models.mae import MaskedAutoencoder
from mpp.models.vit import ViTEncoder

TARGETS = ("mpp", "timm", "hf")
# Metadata an export records when known (mpp files keep all of it; timm and HF configs take mean and std).
METADATA_KEYS = ("variant", "mean", "std", "norm_pix_loss", "source")


def save_mpp(model: ViTEncoder, dst: str | Path, **extra: Any) -> list[Path]:
    """Write mpp's files: ``encoder.safetensors``, plus ``mae.safetensors`` when ``model`` has a decoder.

    Each comes with a ``.json`` copy of its metadata. The full-model file lets pretraining continue.

    Args:
        model: encoder or masked autoencoder.
        dst: directory, or the encoder's ``*.safetensors`` path (``mae.safetensors`` then goes beside it).
        **extra: metadata stored with both (``variant``, ``mean``, ``std``, ``norm_pix_loss``, ``source``, ...).
    """
    dst = Path(dst)
    encoder_path = dst if dst.suffix == ".safetensors" else dst / "encoder.safetensors"
    written = [save_encoder(model, encoder_path, **extra), encoder_path.with_suffix(".json")]
    if isinstance(model, MaskedAutoencoder):
        mae_path = encoder_path.with_name("mae.safetensors")
        mae_extra = {k: v for k, v in extra.items() if k != "norm_pix_loss"}  # it is part of the model config there
        written += [save_mae(model, mae_path, **mae_extra), mae_path.with_suffix(".json")]
    return written


def export_model(
    model: ViTEncoder, dst: str | Path, to: str, metadata: dict[str, Any] | None = None, *, pth: bool = False
) -> list[Path]:
    """Write ``model`` to ``dst`` in format ``to`` (``mpp``, ``timm`` or ``hf``); returns the files written.

    Args:
        model: mpp model.
        dst: destination (see :func:`save_mpp`, :func:`mpp.formats.timm.save_timm`, :func:`mpp.formats.hf.save_hf`).
        to: target format.
        metadata: ``mean``, ``std``, ``variant``, ... as returned in :class:`mpp.formats.load.CheckpointInfo`.
        pth: timm only: write a pickle instead of safetensors.
    """
    metadata = {k: v for k, v in (metadata or {}).items() if k in METADATA_KEYS and v is not None}
    mean, std = metadata.get("mean"), metadata.get("std")
    if to == "mpp":
        return save_mpp(model, dst, **metadata)
    if to in ("timm", "hf") and getattr(model, "stem", "linear") != "linear":
        raise ValueError(
            f"a stem={model.stem} encoder has no {to} ViT equivalent (its patch embedding is per-patch "
            "convolutions, not one projection); export it with --to mpp"
        )
    if to == "timm":
        return save_timm(model, dst, pth=pth, mean=mean, std=std)
    if to == "hf":
        return save_hf(model, dst, mean=mean, std=std)
    raise ValueError(f"unknown target format {to!r}; choose from {', '.join(TARGETS)}")
