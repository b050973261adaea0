"""Telling weight formats apart and reading any of them into mpp-named tensors.

Formats (``FORMATS``):

- ``mpp``: ``encoder.safetensors`` / ``mae.safetensors`` (metadata ``mpp.encoder.v1`` / ``mpp.mae.v1``), a directory
  holding them, or an mpp training checkpoint directory (``model.safetensors`` + ``state.json``; shapes only).
- ``official``: facebookresearch/mae ``.pth`` files, ``{'model': state_dict, ...}``.
- ``timm``: a timm ``VisionTransformer`` state dict (``.pth``/``.bin``/``.safetensors``), or a timm hub directory
  (``config.json`` with ``architecture`` + ``model.safetensors``/``pytorch_model.bin``).
- ``hf``: a Hugging Face ``ViTMAEForPreTraining``/``ViTMAEModel`` directory (``config.json`` with ``model_type``
  ``vit_mae`` + weights), or a bare state dict with Hugging Face names.

Reading never runs code from a file: safetensors cannot hold any and pickles go through
:func:`mpp.formats.safe_load.safe_torch_load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpp.formats.hf import hf_to_mpp, is_hf_state, read_hf_dir
from mpp.formats.native import FORMAT as ENCODER_FORMAT
from mpp.formats.native import MAE_FORMAT
from mpp.formats.official import check_known_keys, unwrap_state_dict
from mpp.formats.safe_load import read_weights_file
from mpp.formats.timm import hints_from_timm_config, read_timm_config, timm_to_mpp
from mpp.runtime import read_json

FORMATS = ("mpp", "official", "timm", "hf")
MPP_FILES = ("mae.safetensors", "encoder.safetensors")
TIMM_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


@dataclass
class Source:
    """A checkpoint read into mpp names.

    Attributes:
        format: one of :data:`FORMATS`.
        path: the file or directory read.
        state: mpp-named tensors.
        config: constructor arguments stored with the weights (mpp, Hugging Face), or ``None`` (read off shapes).
        hints: constructor arguments implied by the file without being a full config (timm ``model_args``,
            ``fc_norm`` meaning average pooling).
        metadata: facts about the weights: ``mean``, ``std``, ``norm_pix_loss``, ``variant`` when known.
        notes: what was adapted or assumed, for the user.
    """

    format: str
    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """The format of a checkpoint file or directory (one of :data:`FORMATS`); pickles are read safely to decide."""
    return read_source(path).format


def read_source(path: str | Path, fmt: str | None = None, *, encoder_only: bool = False) -> Source:
    """Read a checkpoint of any supported format into mpp-named tensors.

    Args:
        path: file or directory.
        fmt: force a format instead of detecting it (``"official"`` and ``"timm"`` read the same way).
        encoder_only: for an mpp directory, read ``encoder.safetensors`` even when ``mae.safetensors`` is there.

    Raises:
        ValueError: unknown layout, or a pickle that would run code.
        FileNotFoundError: nothing readable at ``path``.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if path.is_dir():
        return _read_dir(path, fmt, encoder_only)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    obj, header = read_weights_file(path)
    if header.get("format", "").strip('"') in (ENCODER_FORMAT, MAE_FORMAT) and fmt in (None, "mpp"):
        return _read_mpp_file(path, obj)
    official = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
    state, notes = unwrap_state_dict(obj, str(path))
    if fmt == "hf" or (fmt is None and is_hf_state(state)):
        return Source("hf", path, hf_to_mpp(state), notes=notes + ["Hugging Face names without config.json"])
    hints, meta = hints_from_timm_config(read_timm_config(path))
    return _timm_like(path, fmt or ("official" if official else "timm"), state, notes, hints, meta)


def _timm_like(
    path: Path, fmt: str, state: dict[str, torch.Tensor], notes: list[str], hints: dict[str, Any], meta: dict
) -> Source:
    state, more_notes, more_hints = timm_to_mpp(state, hints.get("img_size"))
    check_known_keys(state, str(path))
    return Source(fmt, path, state, hints={**more_hints, **hints}, metadata=meta, notes=notes + more_notes)


def _read_mpp_file(path: Path, state: dict[str, torch.Tensor]) -> Source:
    from mpp.formats.native import read_metadata

    meta = read_metadata(path)
    config = dict(meta.pop("model" if meta.get("format") == MAE_FORMAT else "encoder"))
    for key in ("format", "mpp_version"):
        meta.pop(key, None)
    return Source("mpp", path, dict(state), config=config, metadata=meta)


def _newest_training_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step_*`` directory of an mpp run, or ``None``.

    The names are zero-padded step counts (``step_00000120``, a second copy ``step_00000120.1``), so they sort by
    name; hidden ``.tmp-*`` directories are incomplete checkpoints still being written. Training keeps its own
    reader (:mod:`mpp.train.checkpoint`); weights only need the newest.
    """
    root = run_dir / "checkpoints"
    steps = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else None


def _read_dir(path: Path, fmt: str | None, encoder_only: bool) -> Source:
    config_path = path / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if fmt == "hf" or (fmt is None and config.get("model_type") == "vit_mae"):
        state, kwargs, meta, notes = read_hf_dir(path)
        return Source("hf", path, state, config=kwargs, metadata=meta, notes=notes)
    if "model_type" in config and fmt is None:
        raise ValueError(
            f"{path}: a Hugging Face {config['model_type']!r} model; only ViTMAE ('vit_mae') directories are supported"
        )
    names = MPP_FILES[1:] if encoder_only else MPP_FILES
    for name in names:
        if (path / name).is_file() and fmt in (None, "mpp"):
            obj, _ = read_weights_file(path / name)
            return _read_mpp_file(path / name, obj)
    newest = _newest_training_checkpoint(path)
    if newest is not None:  # an mpp run directory without exported weights: its newest complete checkpoint
        path = newest
    for name in TIMM_DIR_FILES:
        if (path / name).is_file():
            obj, _ = read_weights_file(path / name)
            state, notes = unwrap_state_dict(obj, str(path / name))
            if (path / "state.json").is_file() and fmt in (None, "mpp"):
                notes.append("mpp training checkpoint: architecture read off tensor shapes")
                return _timm_like(path, "mpp", state, notes, {}, {})
            hints, meta = hints_from_timm_config(config)
            return _timm_like(path, fmt or "timm", state, notes, hints, meta)
    raise ValueError(
        f"{path}: cannot tell the format of this directory; expected config.json + weights (Hugging Face or timm), "
        f"{' or '.join(MPP_FILES)} (mpp), or a training checkpoint (model.safetensors + state.json)"
    )
