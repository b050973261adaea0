"""What every stage needs to run: precision, the accelerator with the CPU multi-process guard, seeding, output dirs.

Also the one atomic-write helper (temporary file, then rename) that turns a full disk into one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

__all__ = [
    "DiskFullError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "is_disk_full",
    "make_accelerator",
    "first_line",
    "one_line",
    "resolve_precision",
    "seed_everything",
    "use_cpu",
]


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


def compile_model(
    model: torch.nn.Module, trial: Callable[[torch.nn.Module], torch.Tensor], backend: str, say: Callable[[str], None]
) -> torch.nn.Module:
    """``torch.compile(model)``, tried on one real forward + backward first; the eager model when that fails.

    Compilation happens lazily at the first call, so a missing compiler, an unsupported op or a bad backend would
    otherwise stop the run at its first step. The trial's gradients are cleared and no optimizer step is taken, so
    the weights and the run's randomness (reseeded every step) are untouched.

    Args:
        model: the prepared model.
        trial: runs the (compiled) model on a batch and returns a scalar loss.
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` traces without generating code).
        say: where the one-line note goes.

    Returns:
        The compiled model, or ``model`` itself.
    """
    try:
        compiled = torch.compile(model, backend=backend)
        trial(compiled).backward()
    except Exception as err:  # noqa: BLE001 - any compiler failure means: train eagerly, say why
        say(f"  torch.compile ({backend}) failed, training without it: {one_line(err)[:300]}")
        return model
    finally:
        model.zero_grad(set_to_none=True)
    say(f"  torch.compile ({backend}): compiled")
    return compiled
