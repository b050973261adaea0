"""The shipped recipes, packaged with mpp: ``--recipe fmnist_tiny`` finds ``fmnist_tiny.yaml`` here by name.

``mpp recipes`` lists them with the first line of each header (what it is, its minutes and results).
"""

from __future__ import annotations

import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent


def packaged(name: str) -> Path | None:
    """The packaged recipe called ``name`` (with or without ``.yaml``), or ``None``."""
    if "/" in name or "\\" in name:
        return None
    path = RECIPES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return path if path.is_file() else None


def summary(path: Path) -> str:
    """The header's first comment line (the recipe's one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def main(argv: list[str] | None = None) -> int:
    """``mpp recipes``: every packaged recipe and its summary."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print("usage: mpp recipes\n\nList the packaged recipes (use one with --recipe NAME).")
        return 0
    for path in sorted(RECIPES.glob("*.yaml")):
        print(f"{path.stem:<26} {summary(path)}")
    return 0
