"""The encoder file mpp hands to later stages: ``encoder.safetensors`` with metadata, plus ``encoder.json``.

The safetensors header carries everything needed to rebuild the encoder (its constructor arguments) and to feed it
(normalisation mean/std), so a probe or fine-tune needs nothing but this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

import mpp
from mpp.models.vit import ViTEncoder

FORMAT = "mpp.encoder.v1"


def encoder_metadata(model: ViTEncoder, **extra: Any) -> dict[str, Any]:
    """Metadata describing ``model``: format, mpp version, constructor arguments and ``extra`` (mean, std, ...)."""
    return {"format": FORMAT, "mpp_version": mpp.__version__, "encoder": dict(model.encoder_config), **extra}


def save_encoder(model: ViTEncoder, path: str | Path, **extra: Any) -> Path:
    """Write the encoder weights (no decoder) to ``path`` (safetensors) and its metadata to ``path``'s ``.json``.

    Args:
        model: an encoder or a full masked autoencoder (decoder keys are dropped).
        path: destination ``*.safetensors``.
        **extra: JSON-serialisable facts stored with it, e.g. ``variant``, ``mean``, ``std``, ``norm_pix_loss``.

    Both files are written to a temporary name and renamed, so an interrupted save leaves no half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.encoder_state_dict() if hasattr(model, "encoder_state_dict") else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = encoder_metadata(model, **extra)
    # safetensors metadata values must be strings: store each entry as JSON.
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    json_path = path.with_suffix(".json")
    tmp_json = json_path.with_name(json_path.name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_json.replace(json_path)
    return path


def read_encoder_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in an ``encoder.safetensors`` header."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {k: json.loads(v) for k, v in raw.items()}
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
    from safetensors.torch import load_file

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
