"""The skipped-files report of a run: every image left out, why and when, in ``RUN/skipped_files.txt``.

A source records what it drops (:meth:`mpp.data.base.ImageDataset.record_skip`): at scan time (not an image, wrong
channels, or not decodable when checked before training) or at decode time (failed when loaded during training, in
whichever DataLoader worker met it). The run writes the scan-time ones once at its start and points the dataset at
the file, so workers append their decode failures; the console gives the count once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpp.data.base import ImageDataset, skip_line
from mpp.runtime import atomic_write_text

SKIPPED_FILES = "skipped_files.txt"


def base_dataset(dataset: Any) -> ImageDataset | None:
    """The :class:`ImageDataset` under wrappers (``Subset.dataset``, ``SeededPretrainSamples.base``...), or None."""
    seen = 0
    while dataset is not None and not isinstance(dataset, ImageDataset) and seen < 8:
        dataset = getattr(dataset, "dataset", None) or getattr(dataset, "base", None)
        seen += 1
    return dataset if isinstance(dataset, ImageDataset) else None


def start_skip_log(dataset: Any, run_dir: Path, write: bool = True) -> str | None:
    """Write the skips found so far to ``run_dir/skipped_files.txt`` and send later ones there; a console line.

    Args:
        dataset: the run's training dataset (wrappers allowed).
        run_dir: the run directory.
        write: whether this process writes the file (the main process); every process still appends decode failures.

    Returns:
        ``"skipped N of M files ..."`` when anything was skipped, else ``None``.
    """
    base = base_dataset(dataset)
    if base is None:
        return None
    path = Path(run_dir) / SKIPPED_FILES
    if write:
        lines = [skip_line(item, base.skip_reasons[item], base.skip_when.get(item, "scan")) for item in base.skipped]
        atomic_write_text(path, "path\twhen\treason\n" + "".join(lines))
    base.skip_log = str(path)
    if not base.skipped:
        return None
    total = getattr(base, "scanned", len(base) + len(base.skipped))
    return f"  skipped {len(base.skipped)} of {total} files ({base.name}); each with its reason in {path}"


def decode_skips(run_dir: Path) -> list[str]:
    """The distinct files that failed to decode during the run (from skipped_files.txt)."""
    path = Path(run_dir) / SKIPPED_FILES
    if not path.is_file():
        return []
    items = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return sorted({parts[0] for parts in items if len(parts) >= 2 and parts[1] == "decode"})
