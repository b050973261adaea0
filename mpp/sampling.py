"""Deterministic sampling: every random choice of a training sample depends only on (seed, epoch, index).

That makes runs resumable bit-for-bit (skipping batches changes nothing downstream) and makes a 2-process run see
exactly the samples, augmentations and masks of a 1-process run with twice the per-process batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mpp.masking import make_noise

_MASK64 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing, so nearby inputs give unrelated seeds)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK64


class SeededPretrainSamples(Dataset):
    """Wrap a dataset whose items are ``(image, label)`` so each item also carries its mask noise.

    Augmentation randomness (torch's global RNG inside the transform) and the mask are seeded from
    ``(seed, epoch, index)``. Set :attr:`epoch` before building each epoch's loader.

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample_seed = mix_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            image, label = self.base[index]
        gen = torch.Generator().manual_seed(sample_seed ^ 0x5DEECE66D)
        length = self.grid_size[0] * self.grid_size[1]
        noise = make_noise(self.mask_type, 1, self.grid_size, self.mask_ratio, generator=gen)
        noise = torch.rand(length, generator=gen) if noise is None else noise[0]
        return image, noise, label


def epoch_order(length: int, epoch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> list[int]:
    """This process's share of one epoch's seeded permutation of ``range(length)`` (equal shares, tail dropped)."""
    sampler = DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)  # fmt: skip
    sampler.set_epoch(epoch)
    return list(sampler)


def epoch_loader(
    dataset: SeededPretrainSamples,
    batch_size: int,
    epoch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    skip_batches: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """This process's loader for one epoch: a seeded permutation split across processes, full batches only.

    Args:
        dataset: the seeded wrapper (its ``epoch`` is set here).
        batch_size: per-process batch.
        epoch: epoch number (reshuffles the order).
        rank: this process's index.
        world_size: number of processes.
        seed: shuffle seed.
        skip_batches: batches of this epoch already consumed (resume mid-epoch).
        num_workers: loader worker processes.
        pin_memory: pin host memory for faster GPU copies.
    """
    dataset.epoch = epoch
    indices = epoch_order(len(dataset), epoch, rank=rank, world_size=world_size, seed=seed)[skip_batches * batch_size :]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int) -> int:
    """Full per-process batches in one epoch (what :func:`epoch_loader` yields with no skip)."""
    return (dataset_len // world_size) // batch_size
