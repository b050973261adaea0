"""In-memory pretraining data: batch augmentation with per-sample determinism, the per-image path's masks."""

from __future__ import annotations

import math

import torch

from mpp.data import build_dataset
from mpp.data.memory import (
    MemoryPretrainSamples,
    augment_batch,
    crop_box,
    decode_all,
)
from mpp.data.sampling import EpochLoader, SeededPretrainSamples, batches_per_epoch

MEAN, STD = [0.5], [0.25]


def test_no_crop_no_flip_is_plain_normalisation():
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    out = augment_batch(images, [1, 2, 3, 4], (1.0, 1.0), False, MEAN, STD)
    assert torch.allclose(out, (images.float() / 255 - 0.5) / 0.25)


def test_flip_mirrors_exactly_the_drawn_samples_and_is_seeded():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    seeds = list(range(100, 116))
    out = augment_batch(images, seeds, (1.0, 1.0), True, MEAN, STD)
    plain = (images.float() / 255 - 0.5) / 0.25
    flipped = [bool(torch.equal(out[i], plain[i].flip(-1))) and not torch.equal(out[i], plain[i]) for i in range(16)]
    kept = [torch.equal(out[i], plain[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0 < sum(flipped) < 16
    assert torch.equal(out, augment_batch(images, seeds, (1.0, 1.0), True, MEAN, STD))  # a function of the seeds


def test_crop_boxes_follow_random_resized_crop():
    for seed in range(200):
        top, left, h, w = crop_box(torch.Generator().manual_seed(seed), 28, 28, (0.2, 1.0))
        assert 0 <= top <= 28 - h and 0 <= left <= 28 - w
        assert 0.2 * 784 * 0.8 <= h * w <= 784 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25


def test_crop_resamples_the_box():
    images = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    images[..., :, :8] = 200  # left half bright
    gen_seed = next(s for s in range(1000) if _box(s)[1] + _box(s)[3] <= 8)  # a box inside the bright half
    out = augment_batch(images, [gen_seed], (0.05, 0.25), False, [0.0], [1.0])
    assert torch.allclose(out[0, 0, 2:-2, 2:-2], torch.full((12, 12), 200 / 255), atol=1e-4)


def _box(seed: int) -> tuple[int, ...]:
    return crop_box(torch.Generator().manual_seed(seed), 16, 16, (0.05, 0.25))


def test_memory_batches_match_the_per_image_order_masks_and_labels():
    dataset = build_dataset("synthetic", "train", None, in_chans=1, synthetic_size=40, synthetic_img_size=16)
    images, labels = decode_all(dataset, (16, 16))
    assert images.dtype == torch.uint8 and images.shape == (40, 1, 16, 16)
    memory = MemoryPretrainSamples(images, labels, (4, 4), 0.75, "random", 7, (1.0, 1.0), False, MEAN, STD)
    from mpp.data.transforms import pretrain_transform

    per_image = SeededPretrainSamples(
        build_dataset("synthetic", "train", pretrain_transform(16, MEAN, STD, scale=(1.0, 1.0), hflip=False),
                      in_chans=1, synthetic_size=40, synthetic_img_size=16),
        (4, 4), 0.75, "random", 7,
    )  # fmt: skip
    ours = list(memory.epoch_batches(8, 3, skip_batches=1))
    theirs = list(EpochLoader(per_image, 8, seed=7, persistent_workers=False)(3, 1))
    assert len(ours) == len(theirs) == batches_per_epoch(40, 8, 1) - 1
    for (img_a, noise_a, lab_a), (img_b, noise_b, lab_b) in zip(ours, theirs, strict=True):
        assert torch.equal(noise_a, noise_b) and torch.equal(lab_a, lab_b)
        assert torch.allclose(img_a, img_b, atol=1e-5)  # no crop, no flip: the same pixels
    # Two processes split the same epoch between them.
    halves = [list(memory.epoch_batches(4, 3, rank=r, world_size=2)) for r in (0, 1)]
    seen = sorted(int(x) for part in halves for batch in part for x in batch[2])
    assert len(seen) == 40 and math.isclose(len(halves[0]), len(halves[1]))
