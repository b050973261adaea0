"""A directory of image files, optionally one sub-folder per class."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpp.data.base import ImageDataset
from mpp.data.images import IMAGE_EXTENSIONS, count_channels, decode_bytes

logger = logging.getLogger(__name__)


def find_images(root: Path) -> list[Path]:
    """Files under ``root`` (recursively, following links) with an image extension, in a fixed sorted order.

    Hidden files and folders (``.ipynb_checkpoints``, macOS ``._name.jpg`` metadata) are left out: they are never
    images a user meant to train on, and a hidden folder must not become a class.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    # Sorting by the relative POSIX path keeps the order the same on every file system and OS.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_header(path: Path, in_chans: int) -> str | None:
    """Why ``path`` cannot be used (not an image, or the wrong channel count), or ``None``; reads the header only."""
    try:
        with Image.open(path) as img:
            if in_chans not in (1, 3) and (channels := count_channels(img)) != in_chans:
                return f"gives {channels} channels, need in_chans={in_chans}"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for files that are not images
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


class ImageFolder(ImageDataset):
    """Every image under a folder; labels from the first-level sub-folder names, ``-1`` for images in the root.

    ``root/<split>`` is used when it exists (``train``, ``val``, ``test``), else ``root`` itself for any split. Class
    names are the sorted first-level sub-folders holding images, so every split must have the same class folders
    for the indices to agree. Each file's header is checked once here (in parallel threads: on network storage the
    scan is I/O bound), which drops files that are not images in the main process; files that pass the header but
    fail to decode (truncated) are skipped while iterating (see :class:`~mpp.data.base.ImageDataset`), except that
    the first few are decoded here so a folder of nothing but broken files fails now.

    Args:
        root: the data directory.
        split: split name, used only when ``root/<split>`` exists.
        transform: applied to each converted image (PIL for 1 or 3 channels, ``uint8`` tensor otherwise).
        in_chans: channels to convert to (see :mod:`mpp.data.images`).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no readable image with the requested channels (or the first ones all fail to decode), naming
            the folder.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, transform: Callable[[Any], Any] | None = None, in_chans: int = 3
    ) -> None:
        super().__init__(transform, in_chans)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"image folder {str(base)!r} does not exist or is not a directory")
        self.root = base / split if (base / split).is_dir() else base
        self.name = f"folder {self.root}"
        candidates = find_images(self.root)
        if not candidates:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"image folder {str(self.root)!r} holds no image files ({exts})")
        with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
            reasons = list(pool.map(lambda p: check_header(p, in_chans), candidates))
        self.paths: list[Path] = []
        for path, reason in zip(candidates, reasons, strict=True):
            if reason is None:
                self.paths.append(path)
            else:
                self.record_skip(str(path), reason, when="scan")
        if not self.paths:
            first = self.skipped[0]
            raise ValueError(
                f"image folder {str(self.root)!r}: none of its {len(candidates)} image files is usable, "
                f"e.g. {first}: {self.skip_reasons[first]}"
            )
        self.scanned = len(candidates)  # the console reports skips once per run (mpp.data.skips), not per dataset
        self._label_from_folders()
        self.check_decodes()

    def _label_from_folders(self) -> None:
        parts = [p.relative_to(self.root).parts for p in self.paths]
        class_dirs = sorted({rel[0] for rel in parts if len(rel) > 1})
        if not class_dirs:
            self.targets = [-1] * len(self.paths)
            return
        index = {name: i for i, name in enumerate(class_dirs)}
        self.classes = class_dirs
        self.targets = [index[rel[0]] if len(rel) > 1 else -1 for rel in parts]
        loose = self.targets.count(-1)
        if loose:
            logger.warning(
                "%s: %d images sit in the root next to class folders %s; they get label -1",
                self.name,
                loose,
                class_dirs,
            )

    def drop(self, indices: list[int]) -> None:
        """Remove files that failed to decode before training (their labels go with them)."""
        gone = set(indices)
        self.paths = [p for i, p in enumerate(self.paths) if i not in gone]
        self.targets = [t for i, t in enumerate(self.targets) if i not in gone]
        self._bad = set()

    def describe(self, index: int) -> str:
        """The file path of item ``index``."""
        return str(self.paths[index])

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """Decode and convert the file of item ``index`` (raises on a broken file)."""
        return decode_bytes(self.paths[index].read_bytes(), self.in_chans)
