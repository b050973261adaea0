"""mpp's own weight files: the encoder a run hands on, the whole MAE, a fine-tuned classifier.

``encoder.safetensors`` (plus ``encoder.json``): the safetensors header carries everything needed to rebuild the
encoder (its constructor arguments) and to feed it (normalisation mean/std), so a probe or fine-tune needs nothing but
this file. ``mae.safetensors`` (:func:`save_mae`) holds the whole masked autoencoder, decoder included, with its full
constructor arguments, to continue pretraining. ``classifier.safetensors`` (:func:`save_classifier`) is what
``mpp finetune`` ends with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mpp._version import __version__
from mpp.models.classifier import ViTClassifier
from mpp.models.mae import MaskedAutoencoder
from mpp.models.vit import ViTEncoder
from mpp.runtime import atomic_path, atomic_write_json, first_line

FORMAT = "mpp.encoder.v1"
MAE_FORMAT = "mpp.mae.v1"


def encoder_metadata(model: ViTEncoder, **extra: Any) -> dict[str, Any]:
    """Metadata describing ``model``: format, mpp version, constructor arguments and ``extra`` (mean, std, ...)."""
    return {"format": FORMAT, "mpp_version": __version__, "encoder": dict(model.encoder_config), **extra}


def save_encoder(model: ViTEncoder, path: str | Path, **extra: Any) -> Path:
    """Write the encoder weights (no decoder) to ``path`` (safetensors) and its metadata to ``path``'s ``.json``.

    Args:
        model: an encoder or a full masked autoencoder (decoder keys are dropped).
        path: destination ``*.safetensors``.
        **extra: JSON-serialisable facts stored with it, e.g. ``variant``, ``mean``, ``std``, ``norm_pix_loss``.

    Both files are written to a temporary name and renamed, so an interrupted save leaves no half-written file.
    """
    state = model.encoder_state_dict() if hasattr(model, "encoder_state_dict") else model.state_dict()
    return _write_with_metadata(state, encoder_metadata(model, **extra), path)


def _write_with_metadata(state: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Path:
    """Write tensors with JSON metadata to ``path`` and the metadata alone to ``path``'s ``.json``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # safetensors metadata values must be strings: store each entry as JSON.
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of any mpp safetensors file (``{}`` entries that are not JSON are kept as strings).

    Raises:
        ValueError: the file is empty, truncated or not safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise unreadable_safetensors(path, err) from None
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:  # files from other tools store plain strings, e.g. {"format": "pt"}
            meta[key] = value
    return meta


def read_encoder_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in an ``encoder.safetensors`` header."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mpp encoder file (metadata format {meta.get('format')!r}, want {FORMAT!r})")
    return meta


def load_encoder(path: str | Path, **overrides: Any) -> tuple[ViTEncoder, dict[str, Any]]:
    """Rebuild an encoder from ``encoder.safetensors``.

    Args:
        path: file written by :func:`save_encoder`.
        **overrides: constructor arguments to change (e.g. ``global_pool="avg"``, ``drop_path_rate=0.1``); a new
            ``img_size`` is applied after loading by resizing the position table.

    Returns:
        ``(encoder, metadata)``.
    """
    meta = read_encoder_metadata(path)
    config = dict(meta["encoder"])
    new_img_size = overrides.pop("img_size", None)
    config.update(overrides)
    encoder = ViTEncoder(**config)
    state = load_file(str(path))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the encoder (missing {missing}, unexpected {unexpected})")
    if new_img_size is not None:
        encoder.set_grid(new_img_size)
    return encoder, meta


# ------------------------------------------------------------------------------------------------- full model
def mae_config(model: MaskedAutoencoder) -> dict[str, Any]:
    """Constructor arguments that rebuild ``model`` (encoder, decoder and loss settings)."""
    dec = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    return {
        **model.encoder_config,
        "decoder_embed_dim": model.decoder_embed_dim,
        "decoder_depth": len(model.decoder_blocks),
        "decoder_num_heads": dec.attn.num_heads if dec else 1,
        "norm_pix_loss": model.norm_pix_loss,
        "mask_ratio": model.mask_ratio,
        "mask_type": model.mask_type,
    }


def save_mae(model: MaskedAutoencoder, path: str | Path, **extra: Any) -> Path:
    """Write the whole masked autoencoder (decoder included, so pretraining can continue) to ``mae.safetensors``.

    The header holds ``format``, ``mpp_version``, ``model`` (constructor arguments) and ``extra``; ``path``'s ``.json``
    repeats it.
    """
    meta = {"format": MAE_FORMAT, "mpp_version": __version__, "model": mae_config(model), **extra}
    return _write_with_metadata(model.state_dict(), meta, path)


def load_mae(path: str | Path, **overrides: Any) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Rebuild a masked autoencoder from a file written by :func:`save_mae`.

    Args:
        path: ``mae.safetensors``.
        **overrides: constructor arguments to change (e.g. ``norm_pix_loss=True``, ``drop_path_rate=0.1``).

    Returns:
        ``(model, metadata)``.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("format") != MAE_FORMAT:
        raise ValueError(f"{path}: not an mpp model file (metadata format {meta.get('format')!r}, want {MAE_FORMAT!r})")
    model = MaskedAutoencoder(**{**meta["model"], **overrides})
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model, meta


def unreadable_safetensors(path: str | Path, err: BaseException) -> ValueError:
    """The one-line error for a ``.safetensors`` file that cannot be read: empty, truncated, or something else."""
    empty = Path(path).is_file() and Path(path).stat().st_size == 0
    why = "the file is empty" if empty else f"truncated or not a safetensors file ({first_line(err)})"
    return ValueError(f"{path}: {why}")


# ------------------------------------------------------------------------------------------------ classifiers
CLASSIFIER_FORMAT = "mpp.classifier.v1"


def save_classifier(path: Path, model: ViTClassifier, **extra: Any) -> Path:
    """The fine-tuned classifier as safetensors, with what rebuilds and feeds it in the header (like encoders)."""
    meta = {
        "format": CLASSIFIER_FORMAT,
        "mpp_version": __version__,
        "encoder": model.encoder.encoder_config,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        **extra,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def load_classifier(path: str | Path) -> tuple[ViTClassifier, dict[str, Any]]:
    """Rebuild a fine-tuned classifier written by :func:`save_classifier`: ``(model in eval mode, metadata)``."""
    meta = read_metadata(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not an mpp classifier (metadata format {meta.get('format')!r})")
    model = ViTClassifier(ViTEncoder(**meta["encoder"]), meta["num_classes"], meta["global_pool"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta
