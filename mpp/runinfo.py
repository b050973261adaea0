"""Facts saved with every run: resolved config, mpp version, git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

import mpp


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


def read_config(path: Path) -> dict[str, Any]:
    """A saved run config without its provenance block."""
    doc = yaml.safe_load(path.read_text()) or {}
    doc.pop("_run", None)
    return doc
