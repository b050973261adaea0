"""Semi-supervised fine-tuning by self-training: the unlabeled training images are used a second time.

``mpp finetune ... finetune.semi.enabled=true``. Round 0 fine-tunes on the labelled images as ``mpp finetune``
does. Every later round labels the *pool* (the training images the budget left unlabeled, never a validation or
test image) with the previous round's model, keeps the confident, class-balanced pseudo-labels, and fine-tunes a
fresh copy of the encoder on the labels plus those (distillation into a new student, so a round's mistakes are not
reinforced in place). Each round is an ordinary fine-tune in ``RUN/round_<r>``: resumable after a kill like any
stage, and a finished round is read back rather than trained again.

Pseudo-labels never see a true label: the pool is predicted through :class:`HiddenLabels`, and the true labels
(where the source has them) only score the kept pseudo-labels for the log (``pseudo_labels.jsonl`` and results.json),
never training.
The round whose model scores best on the validation split is the result (``data.val_size``; else the last).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from mpp.config import FinetuneConfig, SemiSettings
from mpp.data.sampling import mix_seed, targets_of
from mpp.eval.features import batched
from mpp.eval.session import Session, Splits
from mpp.formats.native import load_classifier, save_classifier
from mpp.models.classifier import FINETUNE_HEAD_STD, ViTClassifier
from mpp.runtime import atomic_write_json, atomic_write_text
from mpp.train.checkpoint import resume_state


class HiddenLabels(Dataset):
    """``base``'s images with every label replaced by ``-1``: what the teacher predicts from."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[index][0], -1


class PseudoLabelled(Dataset):
    """Images ``indices`` of ``base`` (a training split with the training transform) with pseudo-labels."""

    def __init__(self, base: Dataset, indices: list[int], labels: list[int]) -> None:
        self.base, self.indices, self.targets = base, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[self.indices[index]][0], self.targets[index]


class Mixed(ConcatDataset):
    """Labelled images then pseudo-labelled ones, with the ``targets`` the loaders and logs read."""

    def __init__(self, labelled: Dataset, pseudo: PseudoLabelled) -> None:
        super().__init__([labelled, pseudo])
        self.targets = [*targets_of(labelled), *pseudo.targets]


def unlabeled_pool(splits: Splits, limit: int | None = None, seed: int = 0) -> list[int]:
    """Training-split indices neither labelled nor held out for validation (a seeded ``limit`` of them), sorted."""
    train = splits.train
    assert isinstance(train, Subset), "build_splits gives Subset splits"
    taken = set(train.indices) | (set(splits.val.indices) if isinstance(splits.val, Subset) else set())
    pool = [i for i in range(len(train.dataset)) if i not in taken]  # type: ignore[arg-type]
    if limit is not None and limit < len(pool):
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(mix_seed(seed, 11)))
        pool = sorted(pool[i] for i in order[:limit].tolist())
    return pool


def select_pseudo_labels(
    probs: torch.Tensor, threshold: float, per_class: int, align: bool
) -> tuple[list[int], list[int], torch.Tensor]:
    """Which pool rows to keep and their pseudo-labels, from the teacher's probabilities alone.

    Distribution alignment (``align``) rescales every row by ``uniform / mean prediction`` and renormalises, so a
    class the teacher over-predicts does not take the pool over; then per class the ``per_class`` most confident rows
    predicted as it with confidence >= ``threshold`` are kept.

    Returns:
        ``(rows, labels, confidences)``, rows sorted.
    """
    if align:
        probs = probs / probs.mean(0, keepdim=True).clamp_min(1e-8)
        probs = probs / probs.sum(1, keepdim=True)
    conf, pred = probs.max(1)
    rows: list[int] = []
    for c in range(probs.shape[1]):
        candidates = torch.nonzero((pred == c) & (conf >= threshold)).flatten()
        best = candidates[conf[candidates].argsort(descending=True, stable=True)[:per_class]]
        rows += best.tolist()
    rows.sort()
    return rows, pred[rows].tolist(), conf[rows]


def pseudo_record(
    round_: int, rows: list[int], labels: list[int], truth: list[int] | None, num_classes: int, pool: int
) -> dict[str, Any]:
    """The log line of one labelling: how many kept per class, and (where the source has labels) their accuracy."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).tolist() if labels else []
    record: dict[str, Any] = {"round": round_, "pool": pool, "kept": len(rows), "per_class": counts}
    if truth is not None and rows:
        right = sum(int(truth[r] == p) for r, p in zip(rows, labels, strict=True))
        record["accuracy"] = round(100.0 * right / len(rows), 2)  # for the log only: never used for training
    return record


def self_train(
    config: FinetuneConfig,
    session: Session,
    splits: Splits,
    finetune: Callable[..., tuple[dict[str, dict[str, Any]], ViTClassifier]],
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """The rounds; ``finetune`` is :func:`mpp.eval.finetune.finetune`. Returns the chosen round's entries and model."""
    semi, say = config.finetune.semi, session.say
    pool = unlabeled_pool(splits, semi.pool_limit, config.seed)
    if not pool:
        raise ValueError("finetune.semi: no unlabeled training images (every image is labelled or validation)")
    train_base = splits.train.dataset  # type: ignore[attr-defined]
    plain = session.splits(config=config)  # the same split with the evaluation transform: what the teacher sees
    pool_view = HiddenLabels(Subset(plain.train.dataset, pool))  # type: ignore[attr-defined]
    all_targets = targets_of(train_base)
    truth = [all_targets[i] for i in pool] if any(t >= 0 for t in all_targets) else None
    say(f"  semi-supervised: self-training, {semi.rounds} round(s) over {len(pool)} unlabeled training images")
    rounds: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, dict[str, Any]], ViTClassifier] | None = None
    labelled: Dataset = splits.train
    for r in range(semi.rounds + 1):
        round_dir = session.run_dir / f"round_{r}"
        entries, model = run_round(config, session, Splits(labelled, splits.test, splits.classes, splits.label_info,
                                                            splits.val), round_dir, finetune)  # fmt: skip
        entry = entries["finetune"]
        score = entry.get("val_top1", float(r))  # without validation the last round is the result
        rounds.append({"round": r, "top1": entry["top1"], "val_top1": entry.get("val_top1"), "train": len(labelled)})
        if best is None or score > best[0]:
            best = (score, r, entries, model)
        if r == semi.rounds:
            break
        teacher = model.eval()
        d, progress = config.data, config.progress
        logits, _ = batched(teacher, pool_view, session.accelerator, d.batch_size, d.num_workers, "pool", progress)
        per_class = semi.per_class or math.ceil(len(pool) / splits.num_classes * (r + 1) / semi.rounds)
        rows, labels, _ = select_pseudo_labels(logits.float().softmax(1), semi.threshold, per_class, semi.align)
        record = pseudo_record(r + 1, rows, labels, truth, splits.num_classes, len(pool))
        records.append(record)
        if session.main:  # the whole log again: a resumed run labels its rounds again, identically
            atomic_write_text(session.run_dir / "pseudo_labels.jsonl", "".join(json.dumps(x) + "\n" for x in records))
        say(
            f"  round {r + 1}: {record['kept']} pseudo-labels kept (threshold {semi.threshold:g}, at most {per_class} "
            f"per class)" + (f", {record['accuracy']:.2f}% right (log only)" if "accuracy" in record else "")
        )
        labelled = Mixed(splits.train, PseudoLabelled(train_base, [pool[i] for i in rows], labels))
    assert best is not None
    _, chosen, entries, model = best
    for entry in entries.values():
        entry["semi"] = {"method": "selftrain", "rounds": rounds, "chosen_round": chosen, "pool": len(pool),
                         "pseudo_labels": records, "settings": vars(semi).copy()}  # fmt: skip
        entry["summary"] = f"self-training round {chosen} of {semi.rounds}; " + entry.get("summary", "")
    return entries, model


def run_round(
    config: FinetuneConfig,
    session: Session,
    splits: Splits,
    round_dir: Path,
    finetune: Callable[..., tuple[dict[str, dict[str, Any]], ViTClassifier]],
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """One round's fine-tune from a fresh copy of the encoder in ``round_dir``; a finished round is read back."""
    done, weights = round_dir / "round.json", round_dir / "classifier.safetensors"
    if done.is_file() and weights.is_file():
        model, _ = load_classifier(weights)
        return json.loads(done.read_text())["entries"], model.to(session.accelerator.device)
    round_dir.mkdir(parents=True, exist_ok=True)
    session.reseed()  # every round's student starts as a lone fine-tune would
    encoder = session.fresh_encoder(config.finetune.drop_path_rate)
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool or "avg", FINETUNE_HEAD_STD)
    found = resume_state(round_dir, session.say)
    entries, trained = finetune(config, classifier, splits, session.accelerator, round_dir, session.say, found)
    if session.main:
        save_classifier(weights, trained, classes=splits.classes)
        atomic_write_json(done, {"entries": entries})
    session.accelerator.wait_for_everyone()
    return entries, trained


def describe(semi: SemiSettings) -> str:
    """One line of the settings."""
    return (
        f"self-training: {semi.rounds} rounds, threshold {semi.threshold:g}, "
        f"{'aligned' if semi.align else 'unaligned'}, per class {semi.per_class or 'growing'}"
    )
