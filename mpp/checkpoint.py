"""Training checkpoints: written atomically, kept few, loaded without executing code, resumed from the newest good one.

Layout: ``RUN/checkpoints/step_00000120/{model.safetensors, optimizer.pt, state.json}`` and ``RUN/checkpoints/latest``
(a text file naming the newest checkpoint, for people and scripts). A checkpoint is written into a hidden temporary
directory and renamed into place only when complete, so a ``step_*`` directory is always whole. A step saved twice
(``checkpoint_every_steps`` landing on an epoch end) gets a new name (``step_00000120.1``) instead of replacing the
first copy: the only complete copy is never deleted before its replacement is in place. Older checkpoints beyond
``keep`` are removed after ``latest`` points at the new one.

Resuming reads the ``step_*`` directories newest first and takes the first one that loads completely; each one
skipped (truncated or zeroed weights, a pickled optimizer file that would run code, bad ``state.json``) is reported
with its reason. ``latest`` is not trusted for this: a garbage or dangling ``latest`` cannot stop a resume.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mpp.runtime import DiskFullError, atomic_write_text, first_line, is_disk_full

LATEST = "latest"
PREFIX = "step_"
SHARDED = "sharded"  # an FSDP checkpoint's torch.distributed.checkpoint directory
STATE_KEYS = ("step", "epoch", "batch_in_epoch")


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from; the message lists each one and why."""


@dataclass
class Checkpoint:
    """A checkpoint read back completely: where it was, its three parts, and the newer ones skipped (name, reason)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sharded: Path | None = None  # an FSDP run's distributed checkpoint (mpp.fsdp); its weights are not read here


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoint directories, oldest first (temporary directories excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=_order)


def _order(path: Path) -> tuple[int, int]:
    """``step_00000120`` -> (120, 0); ``step_00000120.1`` -> (120, 1)."""
    step, _, copy = path.name[len(PREFIX) :].partition(".")
    try:
        return int(step), int(copy or 0)
    except ValueError:
        return -1, 0


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
        optimizer_state: optimiser (and scaler, EMA) state: tensors and plain Python values (weights-only loadable).
        state: JSON-serialisable trainer state (epoch, step, position in epoch, ...).
        keep: checkpoints kept.

    Raises:
        DiskFullError: the disk filled up; the previous checkpoints are untouched and the partial one removed.
    """
    tmp = reserve_checkpoint(run_dir, step)

    def write(directory: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(weights, str(directory / "model.safetensors"))
        torch.save(optimizer_state, directory / "optimizer.pt")

    return publish_checkpoint(run_dir, tmp, write, state, keep)


def reserve_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A fresh hidden directory to write checkpoint ``step`` into (its final name follows the ``.tmp-`` prefix)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{_free_name(root, f'{PREFIX}{step:08d}')}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(
    run_dir: str | Path, tmp: Path, write: Callable[[Path], None], state: dict[str, Any], keep: int
) -> Path:
    """Fill ``tmp`` (``write``, then ``state.json``), rename it into place, point ``latest`` at it, prune to ``keep``.

    Raises:
        DiskFullError: the disk filled up; the previous checkpoints are untouched and the partial one removed.
    """
    root = Path(run_dir) / "checkpoints"
    existing = checkpoint_dirs(run_dir)
    name = tmp.name.removeprefix(".tmp-")
    try:
        write(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        tmp.rename(root / name)  # complete: visible under its final name in one step
        atomic_write_text(root / LATEST, name + "\n")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            intact = f"the previous checkpoint {existing[-1].name} is intact" if existing else "no earlier checkpoint"
            why = f"no space left while writing checkpoint {root / name}; {intact}"
            raise DiskFullError(errno.ENOSPC, why) from err
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def _free_name(root: Path, name: str) -> str:
    """``name``, or ``name.1``, ``name.2``... when a checkpoint of that step already exists."""
    candidate, copy = name, 0
    while (root / candidate).exists():
        copy += 1
        candidate = f"{name}.{copy}"
    return candidate


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load one checkpoint directory completely; no pickled code is run.

    Raises:
        CheckpointError: a part is missing, truncated, not what mpp writes, or would run code (one line, naming it).
    """
    path = Path(path)
    if (path / SHARDED).is_dir():
        return _read_sharded(path)
    part = path / "model.safetensors"
    try:
        model_state = load_file(str(part))
        part = path / "optimizer.pt"
        optimizer_state = torch.load(part, map_location="cpu", weights_only=True)
        part = path / "state.json"
        trainer = json.loads(part.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{part} is missing") from None
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise CheckpointError(f"{part} holds pickled objects that would run code on load; refused") from None
        raise CheckpointError(f"{part} is not a readable torch file ({first_line(err)})") from None
    except (SafetensorError, json.JSONDecodeError, EOFError, RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"{part} is truncated or corrupt ({first_line(err)})") from None
    if not isinstance(trainer, dict) or any(k not in trainer for k in STATE_KEYS):
        raise CheckpointError(f"{path / 'state.json'} lacks the trainer state ({', '.join(STATE_KEYS)})")
    if not isinstance(optimizer_state, dict):
        raise CheckpointError(f"{path / 'optimizer.pt'} is not an mpp optimizer state")
    return Checkpoint(path, model_state, optimizer_state, trainer)


def _read_sharded(path: Path) -> Checkpoint:
    """An FSDP checkpoint: the trainer state, and where the shards are (loaded by every process, mpp.fsdp)."""
    if not (path / SHARDED / ".metadata").is_file():
        raise CheckpointError(f"{path / SHARDED / '.metadata'} is missing (an incomplete sharded checkpoint)")
    try:
        trainer = json.loads((path / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"{path / 'state.json'} is missing or corrupt ({first_line(err)})") from None
    if not isinstance(trainer, dict) or any(k not in trainer for k in STATE_KEYS):
        raise CheckpointError(f"{path / 'state.json'} lacks the trainer state ({', '.join(STATE_KEYS)})")
    return Checkpoint(path, {}, {}, trainer, sharded=path / SHARDED)


def newest_resumable(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads completely, or ``None`` if the run has none.

    Raises:
        CheckpointError: checkpoints exist but none loads; the message lists each and why.
    """
    skipped: list[tuple[str, str]] = []
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            found = read_checkpoint(path)
        except CheckpointError as err:
            skipped.append((path.name, str(err)))
            continue
        found.skipped = skipped
        return found
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise CheckpointError(
            f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be resumed ({reasons}); "
            "move that folder away to start the run over"
        )
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory of a run (by name, not by ``latest``), or ``None``."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DiskFullError",
    "checkpoint_dirs",
    "latest_checkpoint",
    "newest_resumable",
    "read_checkpoint",
    "save_checkpoint",
]
