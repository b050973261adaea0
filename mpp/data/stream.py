"""Streamed Hugging Face datasets for pretraining (``data.source=hf data.streaming=true``).

A dataset too large to download first (or to list) is read as it goes with ``datasets``' streaming mode. Each epoch:

- the stream is shuffled with a buffer (``data.shuffle_buffer`` images; shard order and buffer both follow
  ``(seed, epoch)`` through ``set_epoch``) and shared out over the processes by ``split_dataset_by_node`` (whole
  shards when their count divides by the process count, else every N-th example);
- each process takes ``length // processes // batch`` full batches, where ``length`` is the split's size from the
  dataset's metadata or ``data.stream_length``; a process whose share runs short starts its share over (with a
  warning each time), so all processes take the same number of steps;
- an image's augmentation and mask are seeded from ``(seed, epoch, rank, position in the process's stream)``, so a
  run is reproducible and resumes exactly: a resumed epoch replays the stream from its start and skips the images
  already trained on without decoding them (the checkpoint's position in the epoch is all it needs; the shuffle
  buffer cannot be saved, so replaying is the exact way back). Skipping costs reading, not decoding.

Image cells are decoded by a few threads (``data.stream_threads``; decoding releases the GIL) and augmented in
order in the training process. Unlike map-style sources, 1 process x batch 2B and 2 processes x batch B see different
orders (each process has its own stream). The kNN monitor and reconstruction pictures use the first
``monitor.samples`` labelled images of the unshuffled stream, held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from mpp.data.base import ImageDataset
from mpp.data.hf import decode_cell, open_hf
from mpp.data.sampling import mix_seed, sample_noise

logger = logging.getLogger(__name__)


def open_stream(
    path: str, split: str, image_column: str, cache_dir: str | None = None
) -> tuple[datasets.IterableDataset, int | None]:
    """The split as a stream with its image column left undecoded (mpp decodes it), and its size when known."""
    opened = open_hf(path, split, cache_dir, streaming=True)
    length = None
    if isinstance(opened, datasets.Dataset):  # a save_to_disk directory: streamed in up to 64 shards to share out
        length = len(opened)
        opened = opened.to_iterable_dataset(num_shards=max(1, min(64, length)))
    stream = opened
    features = stream.features
    if features is not None and image_column not in features:
        raise ValueError(f"hf dataset {path!r} has no image column {image_column!r}; columns: {list(features)}")
    if features is not None and isinstance(features[image_column], datasets.Image) and features[image_column].decode:
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream, length


def stream_length(stream: datasets.IterableDataset, known: int | None, split: str, given: int | None, path: str) -> int:
    """Images in the split: ``given`` (``data.stream_length``), else ``known`` (a saved dataset's), else metadata."""
    if given is not None:
        return given
    if known is not None:
        return known
    splits = stream.info.splits if stream.info is not None else None
    if splits and split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    raise ValueError(f"hf dataset {path!r} split {split!r}: its size is not in the metadata; give data.stream_length")


def _label(value: Any) -> int:
    return int(value) if isinstance(value, int) and value >= 0 else -1


class StreamPretrainSamples:
    """Masked, augmented training batches from a stream; ``len()`` is the split's size.

    Args:
        stream: from :func:`open_stream`.
        length: images in the split (:func:`stream_length`).
        transform: the pretraining augmentation (run in order, in this process: its randomness is torch's).
        in_chans: channels to convert to.
        image_column: column of image cells.
        label_column: column of labels (``None``: all ``-1``).
        grid_size: patch grid, for the mask noise.
        mask_ratio: fraction of patches hidden.
        mask_type: ``random`` or ``block``.
        seed: run seed.
        shuffle_buffer: images in the shuffle buffer.
        threads: decoding threads.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        length: int,
        transform: Callable[[Any], torch.Tensor],
        in_chans: int,
        image_column: str,
        label_column: str | None,
        grid_size: tuple[int, int],
        mask_ratio: float,
        mask_type: str,
        seed: int,
        shuffle_buffer: int = 10_000,
        threads: int = 4,
    ) -> None:
        self.stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.length, self.transform, self.in_chans = length, transform, in_chans
        self.image_column, self.label_column = image_column, label_column
        self.grid_size, self.mask_ratio, self.mask_type, self.seed = grid_size, mask_ratio, mask_type, seed
        self.threads = threads

    def __len__(self) -> int:
        return self.length

    def _examples(self, epoch: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """This process's share of the epoch's shuffled stream, started over if it runs short."""
        share = split_dataset_by_node(self.stream, rank=rank, world_size=world_size)
        share.set_epoch(epoch)
        while True:
            empty = True
            for example in share:
                empty = False
                yield example
            if empty:
                raise ValueError(f"process {rank} of {world_size} got no images from the stream")
            logger.warning("stream: process %d's share of epoch %d ran out; starting it over", rank, epoch)

    def epoch_batches(
        self, batch_size: int, epoch: int, *, rank: int = 0, world_size: int = 1, skip_batches: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's full batches ``(images, noise, labels)`` of ``epoch`` from batch ``skip_batches`` on."""
        batches = self.length // world_size // batch_size
        examples = self._examples(epoch, rank, world_size)
        for _ in range(skip_batches * batch_size):
            next(examples)  # cells stay undecoded: replaying costs reading only
        with ThreadPoolExecutor(self.threads) as pool:
            for b in range(skip_batches, batches):
                chunk = [next(examples) for _ in range(batch_size)]
                decoded = list(pool.map(lambda ex: decode_cell(ex[self.image_column], self.in_chans), chunk))
                images, noises, labels = [], [], []
                for offset, (example, image) in enumerate(zip(chunk, decoded, strict=True)):
                    sample_seed = mix_seed(self.seed, epoch, rank, b * batch_size + offset)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(sample_seed)
                        images.append(self.transform(image))
                    noises.append(sample_noise(sample_seed, self.grid_size, self.mask_ratio, self.mask_type))
                    labels.append(_label(example.get(self.label_column)) if self.label_column else -1)
                yield torch.stack(images), torch.stack(noises), torch.tensor(labels)


class StreamHead(ImageDataset):
    """The first ``count`` images of a stream (unshuffled), held in memory: the monitor's and pictures' view.

    Labels: integer (``ClassLabel``) labels as they are; string labels numbered in sorted order among these images.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        count: int,
        transform: Callable[[Any], Any] | None,
        in_chans: int,
        image_column: str,
        label_column: str | None,
        name: str = "stream",
    ) -> None:
        super().__init__(transform, in_chans)
        self.name = f"{name} (first {count} images)"
        head = list(stream.take(count))
        if not head:
            raise ValueError(f"{name}: the stream holds no images")
        self.cells = [example[image_column] for example in head]
        raw = [example.get(label_column) if label_column else None for example in head]
        if raw and all(isinstance(v, str) for v in raw if v is not None) and any(v is not None for v in raw):
            self.classes = sorted({v for v in raw if v is not None})
            index = {c: i for i, c in enumerate(self.classes)}
            self.targets = [index[v] if v is not None else -1 for v in raw]
        else:
            self.targets = [_label(v) for v in raw]

    def load(self, index: int) -> Any:
        """Decode and convert image ``index``."""
        return decode_cell(self.cells[index], self.in_chans)
