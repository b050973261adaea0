"""A dataset's fingerprint: what the no-recipe rules (:mod:`mpp.config.rules`) size a run from.

Image count, size distribution, channels, per-channel mean/std measured on the data, labelled or not, and the bytes
of the decoded images. Large datasets are sampled (:data:`SAMPLE`, seeded, spread over the whole split); the
result is cached in the user's cache directory under a key of the source, path, split and, for files, every file's
size and modification time, so a second run on unchanged data reads it back instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpp.runtime import atomic_write_text

SAMPLE = 2000  # images decoded for sizes and statistics
VERSION = 1  # bump when the fields or their meaning change: older cache entries are then ignored


@dataclass
class Fingerprint:
    """What a split of a source holds (sizes in pixels, statistics of images scaled to [0, 1])."""

    source: str
    split: str
    count: int
    sampled: int
    channels: int  # 1 when every sampled image is grey (R = G = B), else 3
    height_median: int
    width_median: int
    side_min: int  # the smallest shorter side
    side_max: int  # the largest longer side
    square_share: float  # share of sampled images that are square
    sizes_distinct: int  # distinct (height, width) among the sampled images
    mean: list[float]  # per channel of the RGB-converted images (R = G = B for grey data)
    std: list[float]
    classes: int  # 0: unlabeled
    labelled_share: float
    decoded_bytes: int  # count x mean decoded size (uint8, at native size and channels)

    @property
    def resolution(self) -> int:
        """The median shorter side: what a model input size is chosen from."""
        return min(self.height_median, self.width_median)

    def stats(self, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalisation mean/std for a model of ``in_chans`` channels (1: the channels' average)."""
        if in_chans == 3:
            return tuple(self.mean), tuple(self.std)
        if in_chans == 1:
            return (round(statistics.fmean(self.mean), 4),), (round(statistics.fmean(self.std), 4),)
        raise ValueError(f"no measured statistics for {in_chans} channels")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (with the format version)."""
        return {"version": VERSION, **asdict(self)}

    def describe(self) -> str:
        """One line for the console."""
        sizes = f"{self.height_median}x{self.width_median} median"
        if self.sizes_distinct > 1:
            sizes += f" ({self.sizes_distinct} sizes, sides {self.side_min}-{self.side_max}, "
            sizes += f"{self.square_share:.0%} square)"
        labels = f"{self.classes} classes" if self.classes else "unlabeled"
        return (
            f"{self.count} images ({self.sampled} sampled), {sizes}, {self.channels} channel(s), {labels}, "
            f"mean {fmt(self.mean[: self.channels])} std {fmt(self.std[: self.channels])}, "
            f"{self.decoded_bytes / 2**20:.0f} MiB decoded"
        )


def fmt(values: list[float]) -> str:
    """``[0.286, 0.353]``."""
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def measure(dataset: Any, source: str, split: str, sample: int = SAMPLE, seed: int = 0) -> Fingerprint:
    """The fingerprint of ``dataset`` (built with ``transform=None`` and ``in_chans=3``: ``uint8 [3, H, W]`` items).

    Args:
        dataset: the split, yielding ``(uint8 [3, H, W], label)``.
        source: its source name (recorded).
        split: its split name (recorded).
        sample: at most this many images are decoded (seeded, spread over the split).
        seed: which images are sampled.
    """
    count = len(dataset)
    if count == 0:
        raise ValueError(f"{source} split {split!r} holds no images")
    picked = sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:sample].tolist())
    sums, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    pixels, grey, shapes = 0, True, []
    for index in picked:
        image, _ = dataset[index]
        image = torch.as_tensor(image)
        x = image.to(torch.float64).div_(255).flatten(1)
        sums += x.sum(1)
        squares += (x * x).sum(1)
        pixels += x.shape[1]
        grey = grey and bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
        shapes.append(tuple(image.shape[-2:]))
    channels = 1 if grey else 3
    mean = sums / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    byte_sizes = [h * w * channels for h, w in shapes]
    labels = _labels(dataset)
    labelled = [t for t in labels if t >= 0]
    return Fingerprint(
        source=source,
        split=split,
        count=count,
        sampled=len(picked),
        channels=channels,
        height_median=int(statistics.median(h for h, _ in shapes)),
        width_median=int(statistics.median(w for _, w in shapes)),
        side_min=min(min(s) for s in shapes),
        side_max=max(max(s) for s in shapes),
        square_share=sum(h == w for h, w in shapes) / len(shapes),
        sizes_distinct=len(set(shapes)),
        mean=[round(v, 4) for v in mean.tolist()],
        std=[round(v, 4) for v in std.clamp_min(1e-3).tolist()],
        classes=len(set(labelled)),
        labelled_share=len(labelled) / max(len(labels), 1),
        decoded_bytes=int(count * statistics.fmean(byte_sizes)),
    )


def _labels(dataset: Any) -> list[int]:
    """Every label of the split (``-1``: unlabeled) without decoding images where the dataset lists them."""
    from mpp.data.sampling import targets_of

    try:
        return [int(t) for t in targets_of(dataset)]
    except AttributeError:  # a dataset that does not list its labels: read them (streams are never fingerprinted)
        return [int(dataset[i][1]) for i in range(len(dataset))]


def fingerprint_of(data: Any, seed: int = 0) -> tuple[Fingerprint, bool]:
    """The (cached) fingerprint of a data config's split; and whether it came from the cache.

    ``data`` is a data section (source, path, split, columns, synthetic settings); the whole split is measured, the
    validation images included (statistics only: no image is trained on by this).
    """
    from mpp.data import build_dataset

    extra = {"image_column": data.image_column, "label_column": data.label_column}
    if data.source == "synthetic":
        extra.update(size=data.synthetic_size, classes=data.synthetic_classes, seed=seed)

    def compute() -> Fingerprint:
        dataset = build_dataset(
            data.source,
            data.split,
            None,
            path=data.path,
            in_chans=3,
            image_column=data.image_column,
            label_column=data.label_column,
            cache_dir=data.cache_dir,
            synthetic_size=data.synthetic_size,
            synthetic_classes=data.synthetic_classes,
            seed=seed,
        )
        return measure(dataset, data.source, data.split)

    return cached_fingerprint(cache_key(data.source, data.path, data.split, extra), compute)


def cache_key(source: str, path: str | None, split: str, extra: dict[str, Any]) -> str:
    """A hash of what the fingerprint depends on: the source, resolved path, split, files' sizes and mtimes."""
    h = hashlib.sha256(json.dumps([VERSION, source, split, extra], sort_keys=True, default=str).encode())
    if path:
        root = Path(path).expanduser().resolve()
        h.update(str(root).encode())
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    file = os.path.join(dirpath, name)
                    st = os.stat(file)
                    h.update(f"{os.path.relpath(file, root)}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif root.exists():
            st = root.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    """``$MPP_CACHE`` or ``$XDG_CACHE_HOME/mpp`` (default ``~/.cache/mpp``), ``fingerprints/`` inside."""
    base = os.environ.get("MPP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mpp")
    return Path(base).expanduser() / "fingerprints"


def cached_fingerprint(key: str, compute: Any) -> tuple[Fingerprint, bool]:
    """The fingerprint cached under ``key``, else ``compute()`` stored there; and whether it came from the cache."""
    path = cache_dir() / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.pop("version", None) == VERSION:
            return Fingerprint(**stored), True
    except (OSError, ValueError, TypeError):
        pass  # absent, unreadable or of another version: measure again
    fingerprint = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fingerprint.to_dict(), indent=1))
    except OSError:
        pass  # a read-only cache costs a second measurement next time, nothing else
    return fingerprint, False
