"""The encoder an evaluation starts from: ``init`` is a run, an encoder file, any readable checkpoint, or ``random``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpp.models.registry import MODEL_CONFIGS, model_config
from mpp.models.vit import ViTEncoder

ENCODER_FILE = "encoder.safetensors"
# Constructor arguments of a registry variant that belong to the decoder or the pretraining loss.
_NOT_ENCODER = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio", "mask_type")


class InitError(ValueError):
    """``init`` names nothing usable; the message says what was expected."""


def random_encoder(model: str, **overrides: Any) -> ViTEncoder:
    """A freshly initialised encoder of registry variant ``model`` (the official MAE init), for from-scratch runs."""
    if model not in MODEL_CONFIGS:
        raise InitError(f"init=random: unknown model {model!r}; valid: {', '.join(sorted(MODEL_CONFIGS))}")
    config = {k: v for k, v in model_config(model, **overrides).items() if k not in _NOT_ENCODER}
    encoder = ViTEncoder(**config)
    encoder.init_encoder_weights()
    encoder.apply(ViTEncoder.init_linear_and_norm)
    return encoder


def _load_any(path: Path) -> tuple[ViTEncoder, dict[str, Any]]:
    """Encoder and metadata from a run dir, an ``encoder.safetensors``, or any format mpp.formats reads."""
    from mpp.formats import load_checkpoint
    from mpp.formats.native import load_encoder, read_metadata

    if path.is_dir() and (path / ENCODER_FILE).is_file():
        return load_encoder(path / ENCODER_FILE)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        raise InitError(
            f"init {str(path)!r} is a pretraining run without {ENCODER_FILE} (still running or stopped early?); "
            "finish it, or give one of its checkpoints/step_* directories"
        )
    if path.is_file() and path.suffix == ".safetensors" and read_metadata(path).get("format") == "mpp.encoder.v1":
        return load_encoder(path)
    model, info = load_checkpoint(path, encoder_only=True)
    return model, dict(info.metadata)


def load_init(
    init: str | None, model: str | None = None, drop_path_rate: float = 0.0, **overrides: Any
) -> tuple[ViTEncoder, dict[str, Any]]:
    """Build the encoder an evaluation or fine-tune starts from.

    Args:
        init: a pretraining run directory (its ``encoder.safetensors``), an ``encoder.safetensors``, any file or
            directory :func:`mpp.formats.load_checkpoint` reads (official MAE ``.pth``, timm, Hugging Face, mpp), or
            ``"random"`` (the from-scratch baseline).
        model: registry variant; required with ``init="random"`` and otherwise ignored.
        drop_path_rate: stochastic depth of the returned encoder (fine-tuning uses it; probes keep 0).
        **overrides: constructor arguments for ``init="random"`` (e.g. ``img_size``, ``in_chans``).

    Returns:
        ``(encoder, metadata)``; metadata has ``mean``/``std`` when the weights record them, and ``init``.

    Raises:
        InitError: ``init`` missing, not found, or ``random`` without a model.
    """
    if not init:
        raise InitError(
            "init is required: a pretraining run dir, an encoder.safetensors, a checkpoint file, or 'random'"
        )
    if init == "random":
        if not model:
            raise InitError("init=random needs the architecture: set model=<registry name>, e.g. mae_vit_tiny_patch4")
        encoder = random_encoder(model, drop_path_rate=drop_path_rate, **overrides)
        return encoder, {"init": "random", "variant": model}
    path = Path(init)
    if not path.exists():
        raise InitError(
            f"init {init!r}: no such file or directory (expected a pretraining run dir, an encoder.safetensors, "
            "an official/timm/Hugging Face checkpoint, or 'random')"
        )
    loaded, meta = _load_any(path)
    state = loaded.encoder_state_dict() if hasattr(loaded, "encoder_state_dict") else loaded.state_dict()
    # Rebuild from the recorded constructor arguments so drop path (not stored with weights) can be set.
    encoder = ViTEncoder(**{**loaded.encoder_config, "drop_path_rate": drop_path_rate})
    encoder.load_state_dict(state)
    return encoder, {**meta, "init": str(path)}
