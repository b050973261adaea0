"""Facts saved with every run: resolved config, mpp version, git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

import mpp
from mpp.runtime import atomic_write_text


def git_commit() -> str:
    """The commit of the mpp checkout in use (``"unknown"`` outside a git checkout), with ``-dirty`` if modified."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_config(path: Path, config: dict[str, Any], **derived: Any) -> None:
    """Write the resolved config plus provenance (version, commit) and derived numbers to YAML."""
    doc = {**config, "_run": {"mpp_version": mpp.__version__, "git_commit": git_commit(), **derived}}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


def read_config(path: Path) -> dict[str, Any]:
    """A saved run config without its provenance block."""
    doc = yaml.safe_load(path.read_text()) or {}
    doc.pop("_run", None)
    return doc


def settings_to_resume(run_dir: str | Path, recipe: str | None) -> dict[str, Any]:
    """The saved settings of the run in ``run_dir``, to continue it (``--resume``); ``output_dir`` is where it is now.

    Raises:
        ConfigError: ``run_dir`` holds no run config, or a recipe was given too.
    """
    from mpp.config import ConfigError

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not an mpp run directory)")
    if recipe:
        raise ConfigError("--resume takes the run's saved config; do not pass --recipe with it")
    data = read_config(saved)
    data["output_dir"] = str(run_dir)
    return data
