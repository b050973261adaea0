"""Label budgets: which training images keep their labels, a pure function of the labels and a seed.

"MAE vs. scratch with 1% of the labels" only compares encoders if both runs see the same labelled images, so the
subset depends on nothing but ``targets`` and ``seed``: not on the encoder, the transform or the process count.
Each class is shuffled by its own seeded permutation and the subset is a prefix of it, so with one seed a smaller
budget is contained in a larger one (10 labels per class are among the 100 per class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpp.data.holdout import by_class, proportional_counts, shuffled
from mpp.data.sampling import mix_seed


class LabelBudgetError(ValueError):
    """A label budget the data cannot meet (more labels per class than a class has, an empty subset, ...)."""


def label_subset(
    targets: Sequence[int],
    *,
    labels_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """Indices of the labelled images a run may use, sorted.

    Args:
        targets: label of every image (``-1`` = unlabeled, never chosen).
        labels_per_class: exactly this many images of every class.
        fraction: this fraction of the labelled images (exactly ``round(fraction * N)``, at least 1), split across
            classes in proportion to their sizes so rare classes keep their share.
        seed: the subset's seed; the same targets and seed always give the same subset.
        class_names: names used in error messages.

    Returns:
        Sorted dataset indices; every labelled index when neither budget is given.

    Raises:
        LabelBudgetError: both budgets given, a budget out of range, or a class with fewer images than asked for.
    """
    if labels_per_class is not None and fraction is not None:
        raise LabelBudgetError("give labels_per_class or label_fraction, not both")
    groups = by_class(targets)
    if not groups:
        raise LabelBudgetError("the training split has no labelled images")
    if labels_per_class is None and fraction is None:
        return sorted(i for members in groups.values() for i in members)
    if labels_per_class is not None:
        if labels_per_class < 1:
            raise LabelBudgetError(f"labels_per_class must be >= 1, got {labels_per_class}")
        short = {c: len(m) for c, m in groups.items() if len(m) < labels_per_class}
        if short:
            c, n = min(short.items(), key=lambda item: item[1])
            name = f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else ""
            raise LabelBudgetError(
                f"labels_per_class={labels_per_class} but class {c}{name} has only {n} training images "
                f"({len(short)} class(es) too small); lower labels_per_class or use label_fraction"
            )
        counts = {c: labels_per_class for c in groups}
    else:
        assert fraction is not None
        if not 0.0 < fraction <= 1.0:
            raise LabelBudgetError(f"label_fraction must be in (0, 1], got {fraction}")
        counts = proportional_counts({c: len(m) for c, m in groups.items()}, fraction)
    chosen = [i for c, members in groups.items() for i in shuffled(members, seed, c)[: counts[c]]]
    return sorted(chosen)


def split_off(
    targets: Sequence[int], fraction: float, seed: int, min_per_class: int = 1
) -> tuple[list[int], list[int]]:
    """A seeded, class-stratified ``(train, val)`` split of positions ``0..len(targets)-1``.

    Used to carve a validation split out of the (budgeted) training images, never out of the test set. Every class
    keeps at least ``min_per_class`` training images when it has more than that.

    Returns:
        ``(train_positions, val_positions)``, both sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise LabelBudgetError(f"validation fraction must be in (0, 1), got {fraction}")
    groups = by_class(targets)
    counts = proportional_counts({c: len(m) for c, m in groups.items()}, fraction)
    val: list[int] = []
    for c, members in groups.items():
        take = min(counts[c], max(0, len(members) - min_per_class))
        val += shuffled(members, mix_seed(seed, 0x7A1), c)[:take]
    val_set = set(val)
    train = [i for members in groups.values() for i in members if i not in val_set]
    return sorted(train), sorted(val)


def carve_features(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Features ``(x, y)`` of labelled images split into ``(train, val)`` by :func:`split_off` (``None``: too few).

    The stand-in validation split of the cached probe and the pixels' logistic regression when a stage has no
    ``data.val_size``; one salt, so both carve the same images from the same labels and seed.
    """
    train_pos, val_pos = split_off(y.tolist(), fraction, mix_seed(seed, 0x9B0))
    if not train_pos or not val_pos:
        return None
    return (x[train_pos], y[train_pos]), (x[val_pos], y[val_pos])
