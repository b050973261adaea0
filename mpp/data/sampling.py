"""Deterministic sampling: every random choice of a training sample depends only on (seed, epoch, index).

That makes runs resumable bit-for-bit (skipping batches changes nothing downstream) and makes a 2-process run see
exactly the samples, augmentations and masks of a 1-process run with twice the per-process batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from mpp.masking import make_noise

_MASK64 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing, so nearby inputs give unrelated seeds)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK64


def split_key(key: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """``(epoch, index)`` from a seeded dataset's key: an :class:`EpochSampler` pair, or a bare index in ``epoch``."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (epoch, int(key))


def sample_noise(sample_seed: int, grid_size: tuple[int, int], mask_ratio: float, mask_type: str) -> torch.Tensor:
    """One sample's mask noise ``[L]`` (lowest values kept), from its own generator: a function of ``sample_seed``."""
    gen = torch.Generator().manual_seed(sample_seed ^ 0x5DEECE66D)
    noise = make_noise(mask_type, 1, grid_size, mask_ratio, generator=gen)
    return torch.rand(grid_size[0] * grid_size[1], generator=gen) if noise is None else noise[0]


class SeededPretrainSamples(Dataset):
    """Wrap a dataset whose items are ``(image, label)`` so each item also carries its mask noise.

    Augmentation randomness (torch's global RNG inside the transform) and the mask are seeded from
    ``(seed, epoch, index)``. Keys are ``(epoch, index)`` pairs (:class:`EpochSampler`) or bare indices into
    :attr:`epoch`.

    Items: ``(image [C, H, W], noise [L], label)``.
    """

    def __init__(
        self, base: Dataset, grid_size: tuple[int, int], mask_ratio: float, mask_type: str = "random", seed: int = 0
    ) -> None:
        self.base = base
        self.grid_size = grid_size
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = split_key(key, self.epoch)
        sample_seed = mix_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            image, label = self.base[index]
        return image, sample_noise(sample_seed, self.grid_size, self.mask_ratio, self.mask_type), label


def epoch_order(length: int, epoch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> list[int]:
    """This process's share of one epoch's seeded permutation of ``range(length)`` (equal shares, tail dropped)."""
    sampler = DistributedSampler(
        range(length), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return list(sampler)


class EpochSampler(Sampler[tuple[int, int]]):
    """This process's ``(epoch, index)`` keys for one epoch; :attr:`epoch` and :attr:`skip` are set before each.

    The keys carry the epoch to the dataset, so loader workers that outlive an epoch (``persistent_workers``) still
    augment and mask each sample for the right epoch: a sampler runs in the main process, worker copies of the dataset
    do not see attributes set after they started.
    """

    def __init__(self, length: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.skip = 0  # batches of :attr:`epoch` already consumed (resume mid-epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.length, self.epoch, rank=self.rank, world_size=self.world_size, seed=self.seed)
        return ((self.epoch, i) for i in order[self.skip * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.length // self.world_size - self.skip * self.batch_size)


class EpochLoader:
    """One process's loader for every epoch: a seeded permutation split across processes, full batches only.

    Call it as ``loader(epoch, skip_batches)`` for the rest of that epoch. One ``DataLoader`` serves all epochs, so
    its worker processes start once (``persistent_workers``) instead of once per epoch, and keep ``prefetch_factor``
    batches each in flight across the epoch boundary. The dataset must accept ``(epoch, index)`` keys
    (:class:`SeededPretrainSamples`, :class:`SeededItems`).

    Args:
        dataset: the seeded dataset.
        batch_size: per-process batch.
        rank: this process's index.
        world_size: number of processes.
        seed: shuffle seed.
        num_workers: loader worker processes (0: load in this process).
        pin_memory: pin host memory for faster GPU copies.
        persistent_workers: keep the workers between epochs (only with workers).
        prefetch_factor: batches each worker prepares ahead (only with workers).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
    ) -> None:
        self.sampler = EpochSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed)  # type: ignore[arg-type]
        workers = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers else {}
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **workers,
        )

    def __call__(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The loader positioned at batch ``skip_batches`` of ``epoch`` (read when it is iterated)."""
        self.sampler.epoch, self.sampler.skip = epoch, skip_batches
        return self.loader


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int) -> int:
    """Full per-process batches in one epoch (what :class:`EpochLoader` yields with no skip)."""
    return (dataset_len // world_size) // batch_size


def targets_of(dataset: Dataset) -> list[int]:
    """Labels of a dataset or a :class:`~torch.utils.data.Subset` of one, read without decoding images."""
    if isinstance(dataset, Subset):
        base = targets_of(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.targets)  # type: ignore[attr-defined]


class SeededItems(Dataset):
    """``base``'s items with their augmentation randomness seeded from ``(seed, epoch, index)``.

    torch's, Python's and numpy's generators (timm's RandAugment and random erasing use the latter two) are seeded per
    item and restored after, so an image's augmentation does not depend on the worker or process that loads it.
    Keys are ``(epoch, index)`` pairs (:class:`mpp.data.sampling.EpochSampler`) or bare indices into :attr:`epoch`.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = split_key(key, self.epoch)
        sample_seed = mix_seed(self.seed, epoch, index)
        state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)  # timm's RandAugment picks its ops with numpy's global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.base[index]
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def loader_workers(num_workers: int, images_per_epoch: int) -> int:
    """Loader workers for an epoch of ``images_per_epoch`` images: none for small (few-label) epochs.

    Starting worker processes costs about a second, far more than augmenting a few hundred images in the main
    process, and a 100-image epoch is one step (the few-label stages stretch such epochs to hundreds).
    """
    return num_workers if images_per_epoch >= 4096 else 0
