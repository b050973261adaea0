"""Hugging Face ``datasets``: a ``save_to_disk`` directory, local data files, or a dataset on the Hub."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from mpp.data.base import ImageDataset
from mpp.data.images import convert_channels, decode_bytes

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def is_saved_dir(path: Path) -> bool:
    """Whether ``path`` holds a ``save_to_disk`` dataset (or dataset dict)."""
    return path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json"))


def open_hf(
    path: str, split: str, cache_dir: str | None = None, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a Hugging Face dataset (an ``IterableDataset`` read as it goes with ``streaming``).

    ``path`` is tried as, in order: a ``save_to_disk`` directory (a single saved ``Dataset`` serves every split), a
    local directory of data files (``imagefolder``, parquet, ... as ``load_dataset`` infers), a local data file
    (by extension: parquet, arrow, csv, json/jsonl), and otherwise a Hub dataset name. A saved directory is already
    on disk and comes back whole either way (:func:`mpp.data.stream.open_stream` streams it).
    """
    local = Path(path).expanduser()
    if is_saved_dir(local):
        saved = datasets.load_from_disk(str(local))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"hf dataset {path!r} has splits {sorted(saved)}, not {split!r}")
            saved = saved[split]
        return saved
    if local.is_dir():
        return datasets.load_dataset(str(local), split=split, cache_dir=cache_dir, streaming=streaming)
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"hf data file {path!r}: unknown type, expected one of {sorted(_FILE_BUILDERS)}")
        return datasets.load_dataset(
            builder, data_files={split: str(local)}, split=split, cache_dir=cache_dir, streaming=streaming
        )
    if path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"hf dataset path {path!r} does not exist")
    return datasets.load_dataset(path, split=split, cache_dir=cache_dir, streaming=streaming)


def decode_cell(value: Any, in_chans: int) -> Image.Image | torch.Tensor:
    """An image cell decoded and converted to ``in_chans`` (:func:`mpp.data.images.decode_bytes` for bytes)."""
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes | bytearray) else None
    if data is not None:
        return decode_bytes(bytes(data), in_chans)
    with _decode(value) as img:
        return convert_channels(img, in_chans)


def _decode(value: Any) -> Image.Image:
    """A PIL image from any form a ``datasets`` image cell takes: PIL, ``{"bytes", "path"}``, bytes, path, array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, bytes | bytearray):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if value is None:
        raise ValueError("image cell is empty")
    array = np.asarray(value)
    # Array columns come back as nested Python lists (int64): narrow them to a dtype PIL understands.
    if array.dtype.kind in "iub":
        array = array.astype(np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int32)
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    return Image.fromarray(array)


def _labels(ds: datasets.Dataset, column: str) -> tuple[list[int], list[str] | None]:
    """Labels of a column without touching the images; class names from a ``ClassLabel`` or from string labels."""
    feature = ds.features[column]
    values = ds.select_columns([column]).with_format("arrow")[:][column].to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        return [-1 if v is None else int(v) for v in values], list(feature.names)
    if all(v is None or isinstance(v, str) for v in values):
        names = sorted({v for v in values if v is not None})
        index = {name: i for i, name in enumerate(names)}
        return [-1 if v is None else index[v] for v in values], names
    if all(v is None or isinstance(v, int) for v in values):
        return [-1 if v is None else int(v) for v in values], None
    raise ValueError(f"label column {column!r} has type {feature}; expected ClassLabel, integers or strings")


class HFImageDataset(ImageDataset):
    """Images (and labels) from one split of a Hugging Face dataset.

    The image column is read undecoded and decoded here with the same channel conversion as image folders, so a
    broken cell is skipped like a broken file. There is no up-front scan (a Hub dataset can be large); instead the
    first items are decoded at construction so that a wrong column or channel count fails before training.

    Args:
        path: see :func:`open_hf`.
        split: split name.
        transform: applied to each converted image.
        in_chans: channels to convert to (see :mod:`mpp.data.images`).
        image_column: column holding images (``Image`` feature, bytes, paths, or arrays).
        label_column: column holding labels; ``None`` or absent gives label ``-1`` everywhere.
        cache_dir: ``datasets`` cache for ``load_dataset``.

    Raises:
        ValueError: missing image column (naming the available ones), empty split, or undecodable first images.
    """

    def __init__(
        self,
        path: str,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        in_chans: int = 3,
        image_column: str = "image",
        label_column: str | None = "label",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(transform, in_chans)
        self.name = f"hf {path}:{split}"
        ds = open_hf(path, split, cache_dir)
        if image_column not in ds.column_names:
            raise ValueError(f"hf dataset {path!r} has no image column {image_column!r}; columns: {ds.column_names}")
        if len(ds) == 0:
            raise ValueError(f"hf dataset {path!r} split {split!r} is empty")
        if label_column is not None and label_column in ds.column_names:
            self.targets, self.classes = _labels(ds, label_column)
        else:
            if label_column is not None:
                logger.info("%s: no label column %r; items get label -1", self.name, label_column)
            self.targets = [-1] * len(ds)
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            # Decoding ourselves keeps one channel conversion for all sources and lets a bad cell be skipped.
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        # A format saved with the dataset (torch, numpy) would hand us tensors instead of image cells.
        self.data = ds.select_columns([image_column]).with_format(None)
        self.check_decodes()

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """Decode and convert the image cell of item ``index`` (raises on a broken cell)."""
        return decode_cell(self.data[index][self.image_column], self.in_chans)
