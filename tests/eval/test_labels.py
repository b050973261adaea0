"""Label budgets: exact sizes, determinism, nesting, stratified validation split, clear errors."""

from collections import Counter

import pytest

from mpp.eval.labels import LabelBudgetError, label_subset, split_off

# 3 classes of unequal size (50, 30, 20) plus 7 unlabeled images, in a fixed shuffled order.
_SORTED = [0] * 50 + [1] * 30 + [2] * 20 + [-1] * 7
TARGETS = [_SORTED[(i * 37) % len(_SORTED)] for i in range(len(_SORTED))]


def counts(indices):
    return Counter(TARGETS[i] for i in indices)


def test_labels_per_class_exact_and_sorted():
    subset = label_subset(TARGETS, labels_per_class=7, seed=0)
    assert counts(subset) == {0: 7, 1: 7, 2: 7}
    assert subset == sorted(subset) and len(set(subset)) == 21
    assert all(TARGETS[i] >= 0 for i in subset)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_fraction_exact_total_and_proportional(fraction):
    subset = label_subset(TARGETS, fraction=fraction, seed=3)
    assert len(subset) == max(1, round(fraction * 100))  # 100 labelled images
    per_class = counts(subset)
    for c, size in {0: 50, 1: 30, 2: 20}.items():
        assert abs(per_class.get(c, 0) - fraction * size) < 1 + 1e-9


def test_same_seed_same_subset_other_seed_other_subset():
    a = label_subset(TARGETS, labels_per_class=5, seed=11)
    assert a == label_subset(list(TARGETS), labels_per_class=5, seed=11)
    assert a != label_subset(TARGETS, labels_per_class=5, seed=12)
    assert label_subset(TARGETS, fraction=0.2, seed=1) != label_subset(TARGETS, fraction=0.2, seed=2)


def test_smaller_budget_is_inside_larger_one():
    small = label_subset(TARGETS, labels_per_class=4, seed=5)
    assert set(small) <= set(label_subset(TARGETS, labels_per_class=15, seed=5))


def test_no_budget_means_every_labelled_image():
    assert label_subset(TARGETS) == [i for i, t in enumerate(TARGETS) if t >= 0]


def test_budget_errors_are_one_line_and_name_the_class():
    with pytest.raises(LabelBudgetError, match=r"labels_per_class=25 but class 2 \('c2'\) has only 20") as err:
        label_subset(TARGETS, labels_per_class=25, class_names=["c0", "c1", "c2"])
    assert "\n" not in str(err.value)
    with pytest.raises(LabelBudgetError, match="not both"):
        label_subset(TARGETS, labels_per_class=2, fraction=0.1)
    with pytest.raises(LabelBudgetError, match="label_fraction"):
        label_subset(TARGETS, fraction=1.5)
    with pytest.raises(LabelBudgetError, match="no labelled"):
        label_subset([-1, -1])


def test_split_off_is_stratified_disjoint_and_seeded():
    train, val = split_off(TARGETS, 0.1, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == [i for i, t in enumerate(TARGETS) if t >= 0]
    assert counts(val) == {0: 5, 1: 3, 2: 2}
    assert split_off(TARGETS, 0.1, seed=0) == (train, val)
    assert split_off(TARGETS, 0.1, seed=1)[1] != val
    # Ten labels per class: one per class goes to validation, nine stay.
    few = [0] * 10 + [1] * 10
    train, val = split_off(few, 0.1, seed=0)
    assert Counter(few[i] for i in val) == {0: 1, 1: 1}
