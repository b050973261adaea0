"""Weight formats: reading official MAE, timm, Hugging Face and mpp checkpoints, and writing mpp, timm and HF ones.

Python API::

    from mpp.formats import load_checkpoint, export_model
    model, info = load_checkpoint("mae_pretrain_vit_base.pth")     # format detected, architecture read off shapes
    export_model(model, "out/timm", to="timm", metadata=info.metadata)

Key mappings live in :mod:`mpp.formats.hf` and :mod:`mpp.formats.timm`; pickles are read only through
:func:`mpp.formats.safe_load.safe_torch_load` (``weights_only=True``).
"""

from mpp.formats.detect import FORMATS, detect_format, read_source
from mpp.formats.export import TARGETS, export_model, save_mpp
from mpp.formats.hf import save_hf, to_hf
from mpp.formats.load import CheckpointInfo, ShapeMismatchError, load_checkpoint, load_state_dict_checked, load_weights
from mpp.formats.safe_load import safe_torch_load
from mpp.formats.timm import save_timm, timm_kwargs, to_timm

__all__ = [
    "FORMATS",
    "TARGETS",
    "CheckpointInfo",
    "ShapeMismatchError",
    "detect_format",
    "export_model",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_weights",
    "read_source",
    "safe_torch_load",
    "save_hf",
    "save_mpp",
    "save_timm",
    "timm_kwargs",
    "to_hf",
    "to_timm",
]
