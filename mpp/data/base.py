"""The dataset interface every source shares, with the skip-unreadable-images logic in one place."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mpp.data.images import ChannelMismatchError, to_uint8_tensor

logger = logging.getLogger(__name__)


def skip_line(item: str, reason: str, when: str) -> str:
    """One line of skipped_files.txt: ``path<TAB>when<TAB>reason``."""
    return f"{item}\t{when}\t{' '.join(reason.split())}\n"


class ImageDataset(Dataset):
    """Base of all mpp datasets: items are ``(transform(image), label)`` with ``label = -1`` when unlabeled.

    Subclasses fill ``targets`` (one label per item, readable without decoding any image), ``classes`` (names, or
    ``None``) and implement :meth:`load`. An item whose image fails to decode is replaced by the next readable one
    (its own label travels with it), so an epoch never stops on a broken file; the failure is logged once and kept in
    ``skipped``. With DataLoader workers each worker has its own copy of the dataset, so failures found while
    iterating are logged from, and counted in, that worker only; what a source checks up front (the folder's header
    scan) is counted in the main process.

    Attributes:
        classes: class names indexed by label, or ``None`` without labels or names.
        targets: label of every item, ``-1`` where unlabeled.
        skipped: identifiers (paths) of images dropped at scan time or found unreadable in this process.
        skip_reasons: why each entry of ``skipped`` was dropped.
        transform: applied to the image of each item; ``None`` returns a ``uint8 [C, H, W]`` tensor.
        in_chans: channels of every image.
    """

    name = "dataset"

    def __init__(self, transform: Callable[[Any], Any] | None, in_chans: int) -> None:
        self.transform = transform
        self.in_chans = in_chans
        self.classes: list[str] | None = None
        self.targets: list[int] = []
        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}
        self.skip_when: dict[str, str] = {}  # "scan" (dropped before training) or "decode" (failed when loaded)
        self.skip_log: str | None = None  # a run's skipped_files.txt: decode failures in any worker are appended
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """The image of item ``index`` in the model's channels: PIL for 1 or 3 channels, else ``uint8 [C, H, W]``."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A name for item ``index`` in messages (a path where there is one)."""
        return f"{self.name}[{index}]"

    def record_skip(self, item: str, reason: str, when: str = "decode") -> None:
        """Remember that ``item`` is dropped, why and when; append it to ``skip_log`` when one is set."""
        if item in self.skip_reasons:
            return
        self.skipped.append(item)
        self.skip_reasons[item] = reason
        self.skip_when[item] = when
        if self.skip_log is not None:
            with open(self.skip_log, "a") as log:  # O_APPEND: whole short lines, from any worker process
                log.write(skip_line(item, reason, when))

    def check_decodes(self, tries: int = 8) -> None:
        """Decode items until one works, so that data that cannot be read at all fails before training.

        Failures are recorded in ``skipped`` like those met while iterating.

        Raises:
            ChannelMismatchError: the first image cannot give ``in_chans`` channels.
            ValueError: the first ``tries`` items all fail, naming the dataset and their errors.
        """
        for i in range(len(self)):
            if len(self._bad) >= tries:
                break
            try:
                self.load(i)
            except ChannelMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - the same decode errors __getitem__ skips
                self._bad.add(i)
                self.record_skip(self.describe(i), f"{type(err).__name__}: {err}", when="scan")
            else:
                if self._bad:
                    self.drop(sorted(self._bad))
                return
        errors = "; ".join(f"{item}: {self.skip_reasons[item]}" for item in self.skipped[-tries:])
        raise ValueError(f"{self.name}: none of the first {len(self._bad)} images decodes: {errors}")

    def drop(self, indices: list[int]) -> None:
        """Remove items found unreadable before training, so the dataset's size counts only usable images.

        Sources that cannot remove items keep them (they are then skipped while iterating).
        """

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} of {n} items")
        index %= n
        # Bounded by n and by the _bad set: each broken item costs one failed decode per process, and a dataset
        # with nothing readable left ends in an error instead of spinning.
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                img = self.load(i)
            except ChannelMismatchError:
                raise  # a configuration mistake: every image would fail the same way
            except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
                self._bad.add(i)
                self.record_skip(self.describe(i), f"{type(err).__name__}: {err}")
                logger.warning(
                    "%s: skipping unreadable image %s (%s: %s); %d skipped so far in this process",
                    self.name,
                    self.describe(i),
                    type(err).__name__,
                    err,
                    len(self.skipped),
                )
                continue
            image = to_uint8_tensor(img) if self.transform is None else self.transform(img)
            return image, self.targets[i]
        raise RuntimeError(f"no readable image left: {self.report()}")

    def report(self, limit: int = 3) -> str:
        """One paragraph on this dataset: size, classes, and the skipped images with the first ``limit`` reasons."""
        if self.classes is not None:
            n_classes = f"{len(self.classes)} classes"
        else:
            n_classes = "labels without class names" if any(t >= 0 for t in self.targets) else "unlabeled"
        lines = [f"{self.name}: {len(self)} images, {n_classes}, {len(self.skipped)} skipped"]
        lines += [f"  skipped {item}: {self.skip_reasons[item]}" for item in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.report(limit=0)})"
