"""Experiment trackers: ``trackers=tensorboard,wandb,mlflow,...`` (any of accelerate's) in the training commands.

accelerate drives them all; this module only chooses, checks and starts them with the run directory as their home, and
sends pictures (reconstructions, confusion matrices) to each the way it takes them. Local by default: TensorBoard
writes ``RUN/tensorboard``, MLflow a file store in ``RUN/mlruns`` (unless ``MLFLOW_TRACKING_URI`` says otherwise),
W&B its run files in ``RUN/wandb`` (``WANDB_MODE=offline`` keeps them there; ``wandb sync`` uploads them later).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from mpp.runtime import ConfigError

DEFAULT = ["tensorboard"]
# The module each tracker imports, when it is not the tracker's own name (checked before a run writes anything).
PACKAGES = {"comet_ml": "comet_ml", "tensorboard": "torch.utils.tensorboard"}


def parse_trackers(value: Any) -> list[str]:
    """``"tensorboard,wandb"`` / a list / ``"none"`` -> the list of tracker names (``[]`` for none)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    return [] if names == ["none"] else names


def check_trackers(names: list[str], key: str = "trackers") -> None:
    """Every name is one of accelerate's trackers and its package is installed.

    Raises:
        ConfigError: one line naming the key, the tracker, and the choices or the package to install.
    """
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"{key}: unknown tracker {name!r}; choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        module = PACKAGES.get(name, name)
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(f"{key}: {name} is not installed (pip install {module.split('.')[0]})")


def make_trackers(names: list[str], run_dir: Path) -> list[Any]:
    """The accelerate tracker objects for ``names``, each at home in ``run_dir`` (pass them as ``log_with``).

    Built here rather than by name so each gets its own place: TensorBoard ``RUN/tensorboard``, the W&B project and the
    MLflow experiment ``mpp`` with the run directory's name as the run's.
    """
    run_dir = Path(run_dir)
    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            trackers.append(cls("tensorboard", run_dir))
        elif name == "wandb":
            trackers.append(cls("mpp", dir=str(run_dir), name=run_dir.name))
        elif name == "mlflow":
            trackers.append(cls("mpp", run_name=run_dir.name))
        elif cls.requires_logging_directory:
            trackers.append(cls("mpp", run_dir))
        else:
            trackers.append(cls("mpp"))
    return trackers


def start_trackers(accelerator: Accelerator, run_dir: Path, hparams: dict[str, Any] | None = None) -> None:
    """Start the accelerator's trackers (from :func:`make_trackers`) with the run's hyperparameters."""
    if not accelerator.log_with:
        return
    names = {getattr(t, "name", str(t)) for t in accelerator.log_with}
    if "mlflow" in names and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # A file store in the run directory: nothing to set up, and it travels with the run. MLflow 3 keeps that
        # backend in maintenance mode behind this opt-in; MLFLOW_TRACKING_URI (a server, sqlite) replaces it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((Path(run_dir).resolve() / "mlruns").as_uri())
    accelerator.init_trackers("mpp", config=hparams)


def log_picture(accelerator: Accelerator, tag: str, path: Path, step: int | None = None) -> None:
    """Send the PNG at ``path`` to every tracker that takes pictures: as an image, or (MLflow) as an artifact."""
    if not accelerator.is_main_process or not getattr(accelerator, "trackers", None):
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            tracker.log_artifact(str(path), artifact_path=f"pictures/{Path(tag).parent}".rstrip("/."))
        elif tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [pixels]}, step=step)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take scalar hyperparameters only (TensorBoard's hparams): flatten sections, stringify lists and None."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
