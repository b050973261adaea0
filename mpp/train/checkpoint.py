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
import hashlib
import io
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mpp.config import ConfigError, from_dict, to_dict
from mpp.runtime import (
    CheckpointError,
    DiskFullError,
    atomic_write_text,
    first_line,
    is_disk_full,
    read_config,
)

LATEST = "latest"
PREFIX = "step_"
SHARDED = "sharded"  # an FSDP checkpoint's torch.distributed.checkpoint directory
STATE_KEYS = ("step", "epoch", "batch_in_epoch")
CHECKSUMS = "files_sha256"  # state.json: the sha256 of every other file of the checkpoint, checked on resume
REJECTED = "rejected-"  # a checkpoint resume passed over, moved aside when the run writes an older-step one again


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but ``state.json`` (relative POSIX paths)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "state.json")
    return {p.relative_to(directory).as_posix(): file_digests_of(p) for p in files}


def verify_digests(path: Path, trainer: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first file whose bytes changed since it was written."""
    for name, expected in (trainer.get(CHECKSUMS) or {}).items():
        part = path / name
        if not part.is_file():
            raise CheckpointError(f"{part} is missing")
        if file_digests_of(part) != expected:
            raise CheckpointError(f"{part} does not match the checksum written with it (bit rot or a partial copy)")


def file_digests_of(part: Path) -> str:
    """sha256 of one file."""
    digest = hashlib.sha256()
    with part.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """A checkpoint read back completely: where it was, its three parts, and the newer ones skipped (name, reason)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sharded: Path | None = None  # an FSDP run's distributed checkpoint (mpp.train.fsdp); its weights are not read here


@dataclass
class TrainState:
    """Where a run is: counted in optimiser steps; ``batch_in_epoch`` counts micro-batches consumed this epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state saved by :meth:`to_dict` (unknown keys ignored, so older checkpoints still load)."""
        return cls(**{k: data[k] for k in ("step", "epoch", "batch_in_epoch", "images_seen", "extra") if k in data})


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory of a run (by name, not by ``latest``), or ``None``."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


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
        # Serialised in memory, written by Python: a full disk is then an OSError (ENOSPC) naming the file, where
        # torch.save's own writer ends in two chained C++ errors ("basic_ios::clear", "unexpected pos").
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        (directory / "optimizer.pt").write_bytes(buffer.getbuffer())

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
        state = {**state, CHECKSUMS: file_digests(tmp)}  # state.json is written last: it vouches for the rest
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
    written = root / name
    dirs = checkpoint_dirs(run_dir)
    at = dirs.index(written)
    # Checkpoints named after the one just written were passed over by the resume this run continued from (they do
    # not load): set them aside, so pruning never keeps them in place of the good ones.
    for rejected in dirs[at + 1 :]:
        rejected.rename(root / _free_name(root, f"{REJECTED}{rejected.name}"))
    for old in dirs[: at + 1][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return written


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
    verify_digests(path, trainer)
    if not isinstance(optimizer_state, dict):
        raise CheckpointError(f"{path / 'optimizer.pt'} is not an mpp optimizer state")
    return Checkpoint(path, model_state, optimizer_state, trainer)


def _read_sharded(path: Path) -> Checkpoint:
    """An FSDP checkpoint: the trainer state, and where the shards are (loaded by every process, mpp.train.fsdp)."""
    if not (path / SHARDED / ".metadata").is_file():
        raise CheckpointError(f"{path / SHARDED / '.metadata'} is missing (an incomplete sharded checkpoint)")
    try:
        trainer = json.loads((path / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"{path / 'state.json'} is missing or corrupt ({first_line(err)})") from None
    if not isinstance(trainer, dict) or any(k not in trainer for k in STATE_KEYS):
        raise CheckpointError(f"{path / 'state.json'} lacks the trainer state ({', '.join(STATE_KEYS)})")
    verify_digests(path, trainer)
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


# ------------------------------------------------------------------------------------------------ during a run
@dataclass
class Checkpointer:
    """Saves the run at epoch ends (every ``every_epochs``, and the last) and every ``every_steps`` steps.

    ``extra_state`` adds tensors to the optimizer file (an EMA model, the AMP scaler); only the main process writes,
    everyone waits for it. ``writer(model, optimizer, state) -> path`` replaces all of that for state spread over the
    processes (FSDP's sharded checkpoints); every process calls it.
    """

    accelerator: Accelerator
    run_dir: Path
    keep: int = 2
    every_steps: int | None = 0
    every_epochs: int = 1
    per_run: int | None = None  # instead of every_epochs: about this many epoch-end checkpoints over the whole run
    extra_state: Callable[[], dict[str, Any]] | None = None
    writer: Callable[[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]], Path | None] | None = None
    last_saved: dict[str, Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.every_epochs = max(1, self.every_epochs)

    def due(self, epoch: int, schedule: Any) -> bool:
        """Whether a completed ``epoch`` of ``schedule`` gets a checkpoint (every ``every_epochs``, and the last).

        With ``per_run`` the cadence follows the schedule as it stands (a budget fixes its epochs mid-run).
        """
        every = max(1, schedule.epochs // self.per_run) if self.per_run else self.every_epochs
        return epoch % every == 0 or epoch == schedule.epochs

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Path | None:
        """Write a checkpoint of the (unwrapped) model, the optimizer and ``state``; the path on the main process.

        A state just saved (a stop right after a ``every_steps`` checkpoint) is not written again.
        """
        path = None
        if state.to_dict() == self.last_saved:
            return None
        self.last_saved = state.to_dict()
        if self.writer is not None:
            return self.writer(model, optimizer, state.to_dict())
        if self.accelerator.is_main_process:
            model_state = self.accelerator.unwrap_model(model).state_dict()
            opt_state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
            if self.accelerator.scaler is not None:
                opt_state["scaler"] = self.accelerator.scaler.state_dict()
            if self.extra_state is not None:
                opt_state.update(self.extra_state())
            path = save_checkpoint(self.run_dir, state.step, model_state, opt_state, state.to_dict(), self.keep)
        self.accelerator.wait_for_everyone()
        return path


def resume_state(run_dir: Path, say: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads completely (``None`` for a fresh run), saying what was skipped.

    Raises:
        mpp.train.checkpoint.CheckpointError: checkpoints exist but none loads.
    """
    found = newest_resumable(run_dir) if Path(run_dir).is_dir() else None
    if found is not None:
        for name, reason in found.skipped:
            say(f"  skipped checkpoint {name}: {reason}")
    return found


def check_resumable(run_dir: Path, config: Any, free_keys: set[str], command: str) -> None:
    """Refuse to silently continue a run whose saved config differs in anything that changes the result.

    Args:
        run_dir: the run directory (its config.yaml is compared, top-level key by key, after filling keys a newer
            mpp added with their defaults).
        config: the new run's resolved config (a config dataclass).
        free_keys: keys that may differ (where the run lives, logging cadence, ...).
        command: how to continue the run as saved, for the message (``mpp pretrain --resume``).
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    wanted = to_dict(config)
    try:
        saved = to_dict(from_dict(type(config), read_config(saved_path)))
    except ConfigError:
        saved = read_config(saved_path)  # keys this version no longer knows: compare as written
    diffs = [k for k in sorted(set(saved) | set(wanted)) if k not in free_keys and saved.get(k) != wanted.get(k)]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpointed run with different settings ({', '.join(diffs)}); "
            f"use `{command} {run_dir}` to continue it, or choose another output_dir"
        )


def restore(found: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load a checkpoint into an unprepared model and optimizer; the trainer state to continue from."""
    model.load_state_dict(found.model_state)
    optimizer.load_state_dict(found.optimizer_state["optimizer"])
    return TrainState.from_dict(found.trainer_state)


def restore_scaler(found: Checkpoint | None, accelerator: Accelerator) -> None:
    """After ``accelerator.prepare``: the AMP scaler's state, when the run had one."""
    if found is not None and "scaler" in found.optimizer_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(found.optimizer_state["scaler"])


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "DiskFullError",
    "TrainState",
    "check_resumable",
    "checkpoint_dirs",
    "latest_checkpoint",
    "newest_resumable",
    "read_checkpoint",
    "restore",
    "restore_scaler",
    "resume_state",
    "save_checkpoint",
]
