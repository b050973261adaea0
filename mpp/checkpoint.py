"""Training checkpoints: written atomically, kept few, loaded without executing code.

Layout: ``RUN/checkpoints/step_00000120/{model.safetensors, optimizer.pt, state.json}`` and ``RUN/checkpoints/latest``
(a file naming the newest complete checkpoint). A checkpoint is written under a temporary name and renamed when
complete, and ``latest`` is replaced atomically after that, so a crash mid-write never leaves a broken "latest".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; older ones beyond ``keep`` are removed.

    Args:
        run_dir: the run directory.
        step: optimiser step count.
        model_state: model weights (saved as safetensors).
        optimizer_state: optimiser (and scaler) state, plain tensors and numbers (torch.save, weights-only loadable).
        state: JSON-serialisable trainer state (epoch, step, position in epoch, ...).
        keep: checkpoints kept.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, trainer_state)`` of a checkpoint directory; no pickled code is run."""
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return model_state, optimizer_state, state
