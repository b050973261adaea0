"""The validation split: a seeded, class-stratified part of the training split that nothing trains on.

Recipe choices (lr, steps, augmentation, readout, checkpoint) are made on it, never on the test split, and the same
images are held out of pretraining (``data.val_size`` in ``mpp pretrain``) and out of every label budget and unlabeled
pool of the evaluation commands, so an encoder has never seen the images it is chosen by. The split is a pure
function of the labels, ``val_size`` and ``val_seed``: every command with the same three holds out the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpp.data.sampling import mix_seed

_SALT = 0x5A11D  # keeps the validation draw apart from the label budgets' draws of the same seed


def by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    """Indices of each labelled class, in dataset order (label ``-1`` = unlabeled is left out)."""
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        if label >= 0:
            groups.setdefault(int(label), []).append(index)
    return groups


def shuffled(indices: list[int], seed: int, label: int) -> list[int]:
    """``indices`` in the seeded order of class ``label`` (independent of the other classes)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, label))
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[i] for i in order]


def proportional_counts(sizes: dict[int, int], fraction: float) -> dict[int, int]:
    """Per-class counts summing to exactly ``round(fraction * total)``: proportional, largest remainders first."""
    total = sum(sizes.values())
    want = min(total, max(1, round(fraction * total)))
    exact = {c: fraction * n for c, n in sizes.items()}
    counts = {c: min(n, int(exact[c])) for c, n in sizes.items()}
    # Ties between equal remainders go to the lower class index, so the result stays a pure function of the input.
    for c in sorted(sizes, key=lambda c: (-(exact[c] - int(exact[c])), c)):
        if sum(counts.values()) >= want:
            break
        if counts[c] < sizes[c]:
            counts[c] += 1
    return counts


def validation_indices(targets: Sequence[int], val_size: int, seed: int = 0) -> list[int]:
    """The sorted indices of the validation split: ``val_size`` labelled images, classes in proportion.

    Raises:
        ValueError: no labels to stratify by, or ``val_size`` leaves no image of some class for training.
    """
    groups = by_class(targets)
    total = sum(len(m) for m in groups.values())
    if not groups:
        raise ValueError("data.val_size needs labels to hold out a stratified validation split; this split has none")
    if not 0 < val_size < total:
        raise ValueError(f"data.val_size={val_size} must be between 1 and {total - 1} (the labelled training images)")
    counts = proportional_counts({c: len(m) for c, m in groups.items()}, val_size / total)
    full = [c for c, n in counts.items() if n >= len(groups[c])]
    if full:
        raise ValueError(f"data.val_size={val_size} would hold out every image of class {full[0]}; lower it")
    return sorted(i for c, members in groups.items() for i in shuffled(members, mix_seed(seed, _SALT), c)[: counts[c]])


def without_validation(targets: Sequence[int], val_size: int | None, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(kept, val)``: the indices a run may train on and the held-out ones (``val`` empty without ``val_size``)."""
    if not val_size:
        return list(range(len(targets))), []
    val = validation_indices(targets, val_size, seed)
    held = set(val)
    return [i for i in range(len(targets)) if i not in held], val
