"""mpp: masked-patch self-supervised pretraining of Vision Transformers (MAE)."""

from mpp._version import __version__
from mpp.formats import CheckpointInfo, export_model, load_checkpoint, load_weights
from mpp.masking import patchify, random_masking, unpatchify
from mpp.models import MAEOutput, MaskedAutoencoder, ViTEncoder, create_model, list_models, model_config

__all__ = [
    "CheckpointInfo",
    "MAEOutput",
    "MaskedAutoencoder",
    "ViTEncoder",
    "__version__",
    "create_model",
    "export_model",
    "load_checkpoint",
    "load_weights",
    "list_models",
    "model_config",
    "patchify",
    "random_masking",
    "unpatchify",
]
