"""Semi-supervised self-training: the pool, pseudo-labels blind to true labels, class balance, resume of rounds."""

import shutil

import torch
from safetensors.torch import load_file

import mpp.eval.semi as semi_module
import mpp.eval.session as session_module
from mpp.data import build_dataset
from mpp.eval import finetune
from mpp.eval.semi import (
    HiddenLabels,
    PseudoLabelled,
    pseudo_record,
    select_pseudo_labels,
    unlabeled_pool,
    with_labelled_share,
)
from mpp.eval.session import Splits
from mpp.train.checkpoint import checkpoint_dirs

ARGS = [
    "random", "model=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=80", "labels_per_class=4",
    "data.val_size=16", "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.batch_size=8",
    "finetune.min_steps=4", "finetune.semi.enabled=true", "finetune.semi.rounds=1", "finetune.semi.threshold=0.0",
    "finetune.rand_augment=null", "progress=false", "mixed_precision=fp32",
]  # fmt: skip


def test_the_pool_is_neither_labelled_nor_validation_nor_test():
    train = build_dataset("synthetic", "train", None, synthetic_size=30)
    test = build_dataset("synthetic", "test", None, synthetic_size=30)
    splits = Splits(torch.utils.data.Subset(train, [0, 5, 9]), torch.utils.data.Subset(test, list(range(30))), ["a"],
                    val=torch.utils.data.Subset(train, [1, 2]))  # fmt: skip
    pool = unlabeled_pool(splits)
    assert pool == [i for i in range(30) if i not in (0, 5, 9, 1, 2)]
    assert len(unlabeled_pool(splits, limit=7)) == 7 and set(unlabeled_pool(splits, limit=7)) <= set(pool)
    assert all(label == -1 for _, label in HiddenLabels(train))


def test_a_dominant_class_does_not_take_the_pool_over():
    torch.manual_seed(0)
    logits = torch.randn(1000, 4)
    logits[:900, 0] += 3.0  # the teacher calls 90% of the pool class 0
    rows, labels, _ = select_pseudo_labels(logits.softmax(1), 0.0, per_class=50, align=True)
    counts = torch.bincount(torch.tensor(labels), minlength=4).tolist()
    assert counts == [50, 50, 50, 50] and rows == sorted(rows)
    # Unaligned, the teacher calls 90% of the pool class 0; a mere cap kept that skew (measured: 86-1,000 per class
    # on Fashion-MNIST); every class now keeps as many as the scarcest, its most confident ones.
    confident = logits.softmax(1)
    rows, unaligned, conf = select_pseudo_labels(confident, 0.5, per_class=1000, align=False)
    counts = torch.bincount(torch.tensor(unaligned), minlength=4).tolist()
    scarcest = min(int(((confident.argmax(1) == c) & (confident.max(1).values >= 0.5)).sum()) for c in range(4))
    assert counts == [scarcest] * 4 and 0 < scarcest < 50 and conf.min() >= 0.5
    # a round's true labels are repeated up to half of its items, so 3 of them are not drowned by 30 pseudo-labels
    base = torch.utils.data.TensorDataset(torch.zeros(40, 1))
    base.targets = [i % 4 for i in range(40)]
    pseudo = PseudoLabelled(base, list(range(10, 40)), [0] * 30)
    mixed = with_labelled_share(torch.utils.data.Subset(base, [0, 1, 2]), pseudo, 0.5)
    assert len(mixed) == 60 and mixed.targets[:30] == [0, 1, 2] * 10 and mixed.targets[30:] == [0] * 30
    assert len(with_labelled_share(torch.utils.data.Subset(base, [0, 1, 2]), pseudo, 0.0)) == 33
    record = pseudo_record(1, [0, 1], [0, 2], truth=[0, 1], num_classes=3, pool=2)
    assert record["accuracy"] == 50.0 and record["per_class"] == [1, 0, 1]


def _weights(run):
    return load_file(str(run / "classifier.safetensors"))


def _twice_with_other_pool_labels(tmp_path, monkeypatch, args):
    """Run ``args`` into a/, then into b/ with every unlabeled image's hidden label changed; both run dirs."""
    chosen = {}
    real_subset, real_holdout = session_module.label_subset, session_module.without_validation

    def spy_subset(*a, **k):
        chosen["keep"] = real_subset(*a, **k)
        return chosen["keep"]

    def spy_holdout(*a, **k):
        chosen["holdout"] = real_holdout(*a, **k)
        return chosen["holdout"]

    monkeypatch.setattr(session_module, "label_subset", spy_subset)
    monkeypatch.setattr(session_module, "without_validation", spy_holdout)
    assert finetune.main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    taken = set(chosen["keep"]) | set(chosen["holdout"][1])

    def wrong_pool_labels(source, split, *a, **k):
        ds = build_dataset(source, split, *a, **k)
        if split == "train":
            ds.targets = [t if i in taken else (t + 1) % 4 for i, t in enumerate(ds.targets)]
        return ds

    monkeypatch.setattr(session_module, "build_dataset", wrong_pool_labels)
    monkeypatch.setattr(session_module, "label_subset", lambda *a, **k: chosen["keep"])
    monkeypatch.setattr(session_module, "without_validation", lambda *a, **k: chosen["holdout"])
    assert finetune.main([*args, f"output_dir={tmp_path / 'b'}"]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training, whatever the hidden labels
    logged = [(tmp_path / run / "pseudo_labels.jsonl").read_text() for run in ("a", "b")]
    assert logged[0] != logged[1]  # only the log's accuracy saw them
    return a


def _cut_after_first_checkpoint(run):
    """``run`` as a kill would leave it after its first checkpoint: no final weights, no later checkpoints."""
    (run / "classifier.safetensors").unlink()
    checkpoints = checkpoint_dirs(run)  # step_* only, oldest first (a ``latest`` pointer sits beside them)
    assert len(checkpoints) > 1
    for extra in checkpoints[1:]:
        shutil.rmtree(extra)


def test_fixmatch_never_reads_true_labels_and_resumes_exactly(tmp_path, monkeypatch):
    fixmatch = ["finetune.semi.method=fixmatch", "finetune.semi.mu=2", "finetune.log_every=2", "finetune.min_steps=6"]
    a = _twice_with_other_pool_labels(tmp_path, monkeypatch, [*ARGS, *fixmatch])
    # Resumed from its first checkpoint, the pool items and their augmentations (seeded per item) are drawn as before.
    _cut_after_first_checkpoint(tmp_path / "b")
    found, real = [], session_module.resume_state
    monkeypatch.setattr(session_module, "resume_state", lambda *a: found.append(real(*a)) or found[-1])
    assert finetune.main([*ARGS, *fixmatch, f"output_dir={tmp_path / 'b'}"]) == 0
    assert found[0] is not None and 0 < found[0].trainer_state["step"] < 6  # it did resume mid-way
    c = _weights(tmp_path / "b")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_self_training_never_reads_true_labels_and_its_rounds_resume(tmp_path, monkeypatch):
    a = _twice_with_other_pool_labels(tmp_path, monkeypatch, ARGS)

    # an interrupted run: round 1 left mid-way (its first checkpoint only), the final result never written
    (tmp_path / "b" / "classifier.safetensors").unlink()
    (tmp_path / "b" / "round_1" / "round.json").unlink()
    _cut_after_first_checkpoint(tmp_path / "b" / "round_1")
    found, real = [], semi_module.resume_state
    monkeypatch.setattr(semi_module, "resume_state", lambda *a: found.append(real(*a)) or found[-1])
    assert finetune.main([*ARGS, f"output_dir={tmp_path / 'b'}"]) == 0
    assert any(f is not None and f.trainer_state["step"] > 0 for f in found)  # round 1 did resume mid-way
    c = _weights(tmp_path / "b")
    assert all(torch.equal(a[k], c[k]) for k in a)
