"""The images a pretraining run reads, and how each epoch of them is read.

Augmented, pre-masked samples of the training split, the same split plain (for the kNN monitor and the reconstruction
pictures), and their statistics.

Three paths give the same kind of batch ``(images, noise, labels)``, every random choice a function of (seed, epoch,
index): decoded once into memory and augmented in whole batches in the training process (:mod:`mpp.data.memory`, the
default for sources that are arrays anyway), decoded and augmented per image by loader workers
(:class:`mpp.data.sampling.SeededPretrainSamples`), or streamed from a Hugging Face dataset (:mod:`mpp.data.stream`).
``data`` below is a pretraining config's data section (:class:`mpp.config.DataConfig`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Subset

from mpp.data import build_dataset, default_stats
from mpp.data.holdout import without_validation
from mpp.data.memory import MemoryPretrainSamples, decode_all
from mpp.data.sampling import EpochLoader, SeededPretrainSamples
from mpp.data.stream import StreamHead, StreamPretrainSamples, open_stream, stream_length
from mpp.data.transforms import eval_transform, pretrain_transform
from mpp.runtime import ConfigError

# Sources whose images are arrays in memory already: decoding them up front costs seconds and no disk.
IN_MEMORY_SOURCES = ("fashion-mnist", "synthetic")


@dataclass
class PretrainData:
    """The masked training samples, the same images untransformed for pictures and the monitor, their statistics."""

    samples: SeededPretrainSamples | MemoryPretrainSamples | StreamPretrainSamples
    plain: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_memory(self) -> bool:
        """Whether batches are augmented in the training process from decoded images (:mod:`mpp.data.memory`)."""
        return isinstance(self.samples, MemoryPretrainSamples)

    def loader_for(self, data: Any, schedule: Any, accelerator: Any, seed: int) -> Callable[[int, int], Iterable[Any]]:
        """``(epoch, skip_batches) -> this process's batches`` of the rest of that epoch, for the engine's ``fit``.

        ``schedule`` gives the per-process batch and the process count, ``accelerator`` this process and its device.
        """
        samples, batch, rank, world = self.samples, schedule.batch_size, accelerator.process_index, schedule.world
        if isinstance(samples, StreamPretrainSamples | MemoryPretrainSamples):
            return lambda epoch, skip: samples.epoch_batches(
                batch, epoch, rank=rank, world_size=world, skip_batches=skip
            )
        return EpochLoader(
            samples,
            batch,
            rank=rank,
            world_size=world,
            seed=seed,
            num_workers=data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=data.persistent_workers,
            prefetch_factor=data.prefetch_factor,
        )


def data_stats(data: Any, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: the config's, else the source's defaults."""
    if data.mean is not None and data.std is not None:
        mean, std = tuple(data.mean), tuple(data.std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ConfigError(
                f"data.mean/data.std have {len(mean)}/{len(std)} values but the model has {in_chans} channels"
            )
        return mean, std
    return default_stats(data.source, in_chans)


def make_dataset(data: Any, seed: int, transform: Any, in_chans: int, img_size: int) -> Any:
    """The training split of the configured source with ``transform`` (a seeded subset if ``data.limit``)."""
    d = data
    dataset = build_dataset(
        d.source,
        d.split,
        transform,
        path=d.path,
        in_chans=in_chans,
        image_column=d.image_column,
        label_column=d.label_column,
        cache_dir=d.cache_dir,
        synthetic_size=d.synthetic_size,
        synthetic_img_size=img_size,
        synthetic_classes=d.synthetic_classes,
        seed=seed,
    )
    if d.val_size:  # the validation images are never pretrained on (mpp.data.holdout)
        keep, _ = without_validation(list(dataset.targets), d.val_size, d.val_seed)
        dataset = Subset(dataset, keep)
    if d.limit is not None and d.limit < len(dataset):
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: d.limit]
        dataset = Subset(dataset, sorted(keep.tolist()))
    return dataset


def build_pretrain_data(data: Any, seed: int, model: Any, head: int) -> PretrainData:
    """Augmented, pre-masked training samples of ``model``'s size and masking, and the plain view of the same split.

    Args:
        data: the pretraining data section.
        seed: the run seed.
        model: the masked autoencoder (its image size, channels, grid, mask ratio and type).
        head: plain images a streamed split keeps from its start (monitor and pictures); others keep the whole split.
    """
    img_size, in_chans = model.img_size[0], model.in_chans
    mean, std = data_stats(data, in_chans)
    scale = (data.crop_scale_min, 1.0)
    if data.streaming:
        return stream_data(data, seed, model, mean, std, head)
    in_memory = data.in_memory if data.in_memory is not None else data.source in IN_MEMORY_SOURCES
    if in_memory:
        source = make_dataset(data, seed, None, in_chans, img_size)
        images, labels = decode_all(source, model.img_size)
        samples: Any = MemoryPretrainSamples(
            images,
            labels,
            model.grid_size,
            model.mask_ratio,
            model.mask_type,
            seed,
            scale,
            data.hflip,
            mean,
            std,
            base=source,
        )
    else:
        train_tf = pretrain_transform(model.img_size, mean, std, scale=scale, hflip=data.hflip)
        samples = SeededPretrainSamples(
            make_dataset(data, seed, train_tf, in_chans, img_size),
            model.grid_size,
            model.mask_ratio,
            model.mask_type,
            seed,
        )
    plain = make_dataset(data, seed, eval_transform(model.img_size, mean, std), in_chans, img_size)
    return PretrainData(samples, plain, mean, std)


def stream_data(
    data: Any, seed: int, model: Any, mean: tuple[float, ...], std: tuple[float, ...], head: int
) -> PretrainData:
    """A streamed hf split (:mod:`mpp.data.stream`); the first ``head`` images of the stream kept plain."""
    d = data
    assert d.path is not None  # checked with the config
    stream, known = open_stream(d.path, d.split, d.image_column, d.cache_dir)
    length = stream_length(stream, known, d.split, d.stream_length, d.path)
    train_tf = pretrain_transform(model.img_size, mean, std, scale=(d.crop_scale_min, 1.0), hflip=d.hflip)
    samples = StreamPretrainSamples(
        stream,
        length,
        train_tf,
        model.in_chans,
        d.image_column,
        d.label_column,
        model.grid_size,
        model.mask_ratio,
        model.mask_type,
        seed,
        d.shuffle_buffer,
        d.stream_threads,
    )
    plain = StreamHead(
        stream,
        head,
        eval_transform(model.img_size, mean, std),
        model.in_chans,
        d.image_column,
        d.label_column,
        name=f"hf {d.path}:{d.split}",
    )
    return PretrainData(samples, plain, mean, std)
