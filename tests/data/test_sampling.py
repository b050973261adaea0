"""Seeded sampling: one persistent loader for every epoch gives exactly the per-epoch loaders' batches."""

from __future__ import annotations

import torch

from mpp.data import build_dataset
from mpp.data.sampling import EpochLoader, SeededPretrainSamples
from mpp.data.transforms import pretrain_transform

MEAN, STD = [0.5], [0.25]


def _samples() -> SeededPretrainSamples:
    tf = pretrain_transform(16, MEAN, STD, scale=(0.3, 1.0), hflip=True)  # random crops: the epoch must reach them
    base = build_dataset("synthetic", "train", tf, in_chans=1, synthetic_size=24, synthetic_img_size=16)
    return SeededPretrainSamples(base, (4, 4), 0.75, "random", seed=5)


def _same(ours: list, theirs: list) -> bool:
    return len(ours) == len(theirs) and all(
        all(torch.equal(a, b) for a, b in zip(x, y, strict=True)) for x, y in zip(ours, theirs, strict=True)
    )


def test_persistent_workers_see_each_epoch_and_resume_skip():
    reference = _samples()
    plan = ((0, 0), (1, 2), (2, 0))
    expected = {(e, s): list(EpochLoader(reference, 4, seed=5, persistent_workers=False)(e, s)) for e, s in plan}
    assert not _same(expected[(0, 0)], expected[(2, 0)])  # epochs differ, so a stale epoch would be caught
    loader = EpochLoader(_samples(), 4, seed=5, num_workers=1, persistent_workers=True)
    first = iter(loader(0, 0))
    next(first)  # an abandoned, half-read epoch (a compile trial, a stop) must not leak into the next one
    for epoch, skip in plan:
        assert _same(list(loader(epoch, skip)), expected[(epoch, skip)]), (epoch, skip)
    assert loader.loader._iterator is not None and loader.loader.persistent_workers  # one set of workers throughout


def test_ranks_split_an_epoch_without_overlap():
    keys = [list(EpochLoader(_samples(), 3, rank=r, world_size=2, seed=5).sampler) for r in (0, 1)]
    indices = [i for part in keys for _, i in part]
    assert len(indices) == len(set(indices)) == 24 and all(e == 0 for part in keys for e, _ in part)
