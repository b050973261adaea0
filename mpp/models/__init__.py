"""Models: the ViT encoder, the masked autoencoder and the registry of named variants."""

from mpp.models.classifier import ViTClassifier
from mpp.models.mae import MAEOutput, MaskedAutoencoder
from mpp.models.registry import create_model, list_models, model_config
from mpp.models.vit import ViTEncoder

__all__ = [
    "MAEOutput",
    "MaskedAutoencoder",
    "ViTClassifier",
    "ViTEncoder",
    "create_model",
    "list_models",
    "model_config",
]
