"""What every command needs to run: errors and exit codes, the accelerator, seeding, output dirs, run facts.

The accelerator comes with the CPU multi-process guard; the facts saved with a run are its config, version and commit;
the one atomic-write helper (temporary file, then rename) turns a full disk into one clear line.

Exit codes of every ``mpp`` training command (:func:`run_command`): 0 done, 2 bad input (config, files, paths, a full
disk; nothing is lost), 3 the loss diverged (the last good checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from mpp._version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DiskFullError",
    "NonFiniteLossError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "is_disk_full",
    "make_accelerator",
    "first_line",
    "one_line",
    "read_config",
    "resolve_precision",
    "run_command",
    "StopSignalError",
    "seed_everything",
    "use_cpu",
    "write_config",
]


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the value."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from; the message lists each one and why."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before anything is saved from that state."""


class StopSignalError(RuntimeError):
    """A stop signal ended the run after a checkpoint; ``code`` is the exit code (128 + the signal number)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class DiskFullError(OSError):
    """The disk filled up while a file was written; the file's previous version (if any) is untouched."""


def resolve_precision(requested: str, cpu: bool) -> str:
    """Accelerate's precision for ``requested``: ``auto`` is bf16 on a CUDA GPU with bf16, fp32 (``no``) elsewhere.

    On CPUs without AMX / AVX512-BF16 (e.g. AMD EPYC with AVX2 only) bf16 matmuls fall back to slow kernels:
    measured here a tiny-MAE step took 12 s in bf16 against 0.5 s in fp32.
    """
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and not cpu and torch.cuda.is_bf16_supported() else "no"
    return "no" if requested == "fp32" else requested


def use_cpu(requested: bool) -> bool:
    """Run on the CPU if asked, or when launched as several processes on a machine without CUDA.

    Accelerate only sets up a gloo process group for ``accelerate launch --multi_gpu`` without GPUs when told the
    run is on the CPU; otherwise each process would silently train alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return requested or (launched and not torch.cuda.is_available())


def make_accelerator(precision: str, cpu: bool, **kwargs: Any) -> Accelerator:
    """The accelerator every stage runs on: resolved precision, CPU guard for multi-process CPU launches."""
    return Accelerator(mixed_precision=resolve_precision(precision, cpu), cpu=use_cpu(cpu), **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) through accelerate."""
    set_seed(seed)


def check_output_dir(path: Path) -> Path:
    """Create ``path`` (and parents) or fail with one line saying why it cannot hold a run.

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a file.
        PermissionError: the directory cannot be written (read-only mount, permissions).
    """
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"is below {parent}, which is"
            raise NotADirectoryError(f"output_dir {path} {where} a file, not a directory; choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = err.strerror or str(err)
        raise PermissionError(f"output_dir {path} cannot be created ({why}); choose another output_dir") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {path} is not writable (read-only mount or permissions)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_note: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` keeps its previous content. Running out of disk space
    becomes :class:`DiskFullError` naming the file (``keep_note`` adds what else is still intact).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(err):
            note = f"; {keep_note}" if keep_note else ""
            raise DiskFullError(errno.ENOSPC, f"no space left while writing {path}{note}") from err
        raise


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC itself, or a library's wrapping of it (safetensors raises its own error with the OS message)."""
    if isinstance(err, DiskFullError):
        return False  # already phrased
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "os error 28" in str(err)


def atomic_write_text(path: str | Path, text: str, keep_note: str = "") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, keep_note) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, keep_note: str = "") -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n", keep_note)


def atomic_save_image(image: Any, path: str | Path, keep_note: str = "") -> Path:
    """Save a PIL image (format from ``path``'s suffix) atomically: a full disk is the one-line error, no half PNG."""
    path = Path(path)
    with atomic_path(path, keep_note) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return path


def one_line(err: BaseException) -> str:
    """An error as the single line a command prints: OSErrors without their ``[Errno n]`` prefix."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = str(err)
    return " ".join(text.split())


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an error's message (at most ``limit`` characters): a library's detail inside our one line."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


# ------------------------------------------------------------------------------------------------ commands
def run_command(prog: str, build: Callable[[], Any], run: Callable[[Any], Any], print_config: bool = False) -> int:
    """Build the config (``build``), then print it or ``run`` it; errors become one line and an exit code."""
    try:
        config = build()
        if print_config:
            print(yaml.safe_dump(asdict(config), sort_keys=False))
            return 0
        run(config)
    except (ValueError, CheckpointError, OSError) as err:  # ConfigError is a ValueError; OSError: full disk, bad dir
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    except StopSignalError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (inside one, the engine checkpoints first)
        print(f"{prog}: interrupted; a resume continues from the last checkpoint, if any", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------------ run facts
def git_commit() -> str:
    """The commit of the mpp checkout in use (``"unknown"`` outside a git checkout), with ``-dirty`` if modified."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_config(path: Path, config: dict[str, Any], **derived: Any) -> None:
    """Write the resolved config plus provenance (version, commit) and derived numbers to YAML."""
    doc = {**config, "_run": {"mpp_version": __version__, "git_commit": git_commit(), **derived}}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


def read_config(path: Path) -> dict[str, Any]:
    """A saved run config without its provenance block.

    Raises:
        ConfigError: the file is not valid YAML or not a mapping (one line naming it).
    """
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable run config ({first_line(err)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a run config (a {type(doc).__name__}, not a mapping of settings)")
    doc.pop("_run", None)
    return doc


def read_json(path: Path) -> Any:
    """A JSON file; a broken one is a ``ValueError`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({first_line(err)})") from None
