"""Reading weight files without running code from them.

Pickle-based files (``.pth``, ``.bin``, ``.pt``) can execute arbitrary code when unpickled, so they are read only with
``torch.load(weights_only=True)``, which rebuilds tensors, containers and numbers and refuses everything else. A
refused file is reported in one line; mpp never retries with ``weights_only=False``.

One class is allowlisted: ``argparse.Namespace``. The official MAE training script (and timm's) stores its command
line arguments as a Namespace next to the weights (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``). Rebuilding
one only creates an empty Namespace and fills its ``__dict__``; its values still pass through the same restricted
unpickler, so it runs no code from the file.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mpp.formats.native import unreadable_safetensors
from mpp.runtime import first_line

SAFE_GLOBALS = [argparse.Namespace]
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")

# Exact names of data-holding classes that commonly ride along in training checkpoints (numpy scalars in metrics,
# paths in arguments). A file refused only because of these is very likely harmless and the message says so; it is
# still not unpickled. Exact names, not module prefixes: "pathlib.Path.touch" must not pass for data.
_DATA_ONLY_GLOBALS = {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "_codecs.encode",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
    "collections.defaultdict",
    "datetime.datetime",
    "datetime.date",
}


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain data (``weights_only=True``), on the CPU.

    Raises:
        ValueError: the file's pickle references code or objects other than plain tensors and containers; the message
            names the file and the refused globals.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (an interrupted download or copy?)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a refusal: the bytes are not a pickle at all
            raise ValueError(f"{path}: not a PyTorch weights file ({first_line(err)})") from None
        names = _unsafe_globals(path, err)
        # `from None`: torch's own message suggests weights_only=False, which is exactly what must not be done blindly.
        raise ValueError(_refusal_message(path, names)) from None


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """Globals the pickle asks for that are not allowed, read from the opcodes (nothing is executed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # older or legacy-format files: fall back to the name in torch's message
        names = []
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    return sorted(set(names))


def _refusal_message(path: Path, names: list[str]) -> str:
    shown = ", ".join(names) if names else "unknown"
    if names and all(n in _DATA_ONLY_GLOBALS or n.startswith("numpy.dtypes.") for n in names):
        return (
            f"{path}: refused to load: besides tensors it holds pickled objects that are not plain tensors ({shown}); "
            "these look like harmless training extras (arguments, metrics), but unpickling them can run code, so mpp "
            "does not. If you trust the file, re-save only its tensors (e.g. with safetensors) and convert that."
        )
    return (
        f"{path}: refused to load: the file contains code or objects that are not plain tensors ({shown}); "
        "unpickling it could run arbitrary code, so mpp does not load it."
    )


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` file (a format that cannot hold code).

    Raises:
        ValueError: the file is empty, truncated or not safetensors (one line naming it).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError, RuntimeError) as err:
        raise unreadable_safetensors(path, err) from None


def read_weights_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The content of a weights file: safetensors (with its metadata) or a weights-only pickle (metadata ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    try:
        return safe_torch_load(path), {}
    except ValueError:
        raise  # already one line: a refusal, an empty file
    except Exception as err:  # noqa: BLE001 - on bytes that are not a pickle torch's unpickler raises anything
        raise ValueError(f"{path}: truncated or not a PyTorch weights file ({first_line(err)})") from None
