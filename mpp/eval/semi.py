"""Semi-supervised fine-tuning: the unlabeled training images are used a second time.

``mpp finetune ... finetune.semi.enabled=true`` (``finetune.semi.method=selftrain``, the default, or ``fixmatch``:
:class:`FixMatch`, which adds a consistency term to every step of one fine-tune).

Self-training: round 0 fine-tunes on the labelled images as ``mpp finetune``
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

from mpp.config import FinetuneConfig, SemiSettings
from mpp.config.stages import finetune_pool
from mpp.data.sampling import mix_seed, targets_of
from mpp.data.transforms import finetune_transform
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


def with_labelled_share(labelled: Dataset, pseudo: PseudoLabelled, share: float) -> Mixed:
    """The labelled images, repeated until they are at least ``share`` of the items, then the pseudo-labelled ones.

    Without it 100 true labels are 1% of a 10,000-pseudo-label round and the student sees each of them a few times
    where the labels-only round saw it hundreds of times (measured: such rounds lost 4 validation points).
    """
    times = 1
    if share > 0 and len(pseudo):
        times = max(1, math.ceil(share / (1 - share) * len(pseudo) / len(labelled)))  # type: ignore[arg-type]
    if times > 1:
        assert isinstance(labelled, Subset), "build_splits gives Subset splits"
        labelled = Subset(labelled.dataset, list(labelled.indices) * times)
    return Mixed(labelled, pseudo)


def unlabeled_pool(splits: Splits, limit: int | None = None, seed: int = 0) -> list[int]:
    """Training-split indices neither labelled nor held out for validation (a seeded ``limit`` of them), sorted.

    Raises:
        ValueError: there are none.
    """
    train = splits.train
    assert isinstance(train, Subset), "build_splits gives Subset splits"
    taken = set(train.indices) | (set(splits.val.indices) if isinstance(splits.val, Subset) else set())
    pool = [i for i in range(len(train.dataset)) if i not in taken]  # type: ignore[arg-type]
    if limit is not None and limit < len(pool):
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(mix_seed(seed, 11)))
        pool = sorted(pool[i] for i in order[:limit].tolist())
    if not pool:
        raise ValueError("finetune.semi: no unlabeled training images (every image is labelled or validation)")
    return pool


def aligned_to_uniform(probs: torch.Tensor, across_processes: bool = False) -> torch.Tensor:
    """Distribution alignment (ReMixMatch): rows rescaled by ``uniform / mean prediction``, then renormalised.

    ``across_processes``: the mean prediction is the whole batch's, every process's part of it (equal parts, as the
    distributed sampler gives), so a run on several processes aligns as the same batch on one does.
    """
    mean = probs.mean(0, keepdim=True)
    if across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mean)
        mean = mean / dist.get_world_size()
    probs = probs / mean.clamp_min(1e-8)
    return probs / probs.sum(1, keepdim=True)


def threshold_of(semi: SemiSettings) -> float:
    """``semi.threshold``, or the method's own default.

    FixMatch 0.9; self-training 0: its class-balanced top-k already keeps only each class's most confident rows, and a
    high threshold starves the hardest class (every class then keeps as few as it has).
    """
    if semi.threshold is not None:
        return semi.threshold
    return 0.9 if semi.method == "fixmatch" else 0.0


def select_pseudo_labels(
    probs: torch.Tensor, threshold: float, per_class: int, align: bool
) -> tuple[list[int], list[int], torch.Tensor]:
    """Which pool rows to keep and their pseudo-labels, from the teacher's probabilities alone.

    Distribution alignment (``align``) rescales every row by ``uniform / mean prediction`` and renormalises, so a
    class the teacher over-predicts does not take the pool over. Then every class keeps the same number of rows (class-
    balanced self-training, as CBST): its most confident rows predicted as it with confidence >= ``threshold``, as
    many as the scarcest class has (classes with none left out), at most ``per_class``. A mere cap was not enough:
    measured on Fashion-MNIST with 10 labels per class, kept counts ranged 86-1,000 per class, and the student trained
    on them lost 4 validation points to the labels-only model, with the rare classes' recall falling.

    Returns:
        ``(rows, labels, confidences)``, rows sorted.
    """
    if align:
        probs = aligned_to_uniform(probs)
    conf, pred = probs.max(1)
    ranked = []
    for c in range(probs.shape[1]):
        candidates = torch.nonzero((pred == c) & (conf >= threshold)).flatten()
        ranked.append(candidates[conf[candidates].argsort(descending=True, stable=True)])
    # A class the teacher never predicts (confidently) cannot be balanced: it gets none and does not zero the rest.
    keep = min([per_class] + [len(r) for r in ranked if len(r)])
    rows = sorted(row for r in ranked for row in r[:keep].tolist())
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
    run_dir: Path | None = None,
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """The rounds; ``finetune`` is :func:`mpp.eval.finetune.finetune`. Returns the chosen round's entries and model.

    ``run_dir`` (default the session's) holds ``round_<r>/`` and ``pseudo_labels.jsonl``: a sweep gives each budget its
    own.
    """
    semi, say = config.finetune.semi, session.say
    run_dir = run_dir or session.run_dir
    pool = unlabeled_pool(splits, semi.pool_limit, config.seed)
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
        round_dir = run_dir / f"round_{r}"
        entries, model = run_round(config, session, Splits(labelled, splits.test, splits.classes, splits.label_info,
                                                            splits.val), round_dir, finetune)  # fmt: skip
        entry = entries["finetune"]
        score = entry.get("val_top1", float(r))  # without validation the last round is the result
        rounds.append({"round": r, "top1": entry["top1"], "val_top1": entry.get("val_top1"), "train": len(labelled)})
        if best is None or score > best[0]:
            best = (score, r, entries, model)
        if r == semi.rounds:
            break
        teacher = best[3].eval()  # the best round so far on validation labels the pool: a worse one's errors compound
        d, progress = config.data, config.progress
        logits, _ = batched(teacher, pool_view, session.accelerator, d.batch_size, d.num_workers, "pool", progress)
        per_class = semi.per_class or math.ceil(len(pool) / splits.num_classes * (r + 1) / semi.rounds)
        threshold = threshold_of(semi)
        rows, labels, _ = select_pseudo_labels(logits.float().softmax(1), threshold, per_class, semi.align)
        record = pseudo_record(r + 1, rows, labels, truth, splits.num_classes, len(pool))
        records.append(record)
        if session.main:  # the whole log again: a resumed run labels its rounds again, identically
            atomic_write_text(run_dir / "pseudo_labels.jsonl", "".join(json.dumps(x) + "\n" for x in records))
        say(
            f"  round {r + 1}: {record['kept']} pseudo-labels kept (threshold {threshold:g}, the same count per class, "
            f"at most {per_class})" + (f", {record['accuracy']:.2f}% right (log only)" if "accuracy" in record else "")
        )
        pseudo = PseudoLabelled(train_base, [pool[i] for i in rows], labels)
        labelled = with_labelled_share(splits.train, pseudo, semi.labelled_share)
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
    classifier = ViTClassifier(encoder, splits.num_classes, finetune_pool(config), FINETUNE_HEAD_STD)
    found = resume_state(round_dir, session.say)
    entries, trained = finetune(config, classifier, splits, session.accelerator, round_dir, session.say, found)
    if session.main:
        save_classifier(weights, trained, classes=splits.classes)
        atomic_write_json(done, {"entries": entries})
    session.accelerator.wait_for_everyone()
    return entries, trained


# ------------------------------------------------------------------------------------------------ FixMatch
class FixMatchItems(Dataset):
    """Labelled item ``i`` plus ``mu`` pool images, each as a weak and a strong view.

    The pool images are drawn with torch's generator, which :class:`mpp.data.sampling.SeededItems` seeds per (epoch,
    item): the draw is exact on resume and the same on any worker. ``truth`` (``-1`` where unknown) travels along for
    the log's pseudo-label accuracy only; the loss never reads it.
    """

    def __init__(self, labelled: Dataset, weak: Dataset, strong: Dataset, pool: list[int], mu: int, truth: list[int]):
        self.labelled, self.weak, self.strong, self.pool, self.mu, self.truth = labelled, weak, strong, pool, mu, truth
        self.targets = targets_of(labelled)

    def __len__(self) -> int:
        return len(self.labelled)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, label = self.labelled[index]
        picks = torch.randint(len(self.pool), (self.mu,)).tolist()
        weak = torch.stack([self.weak[self.pool[j]][0] for j in picks])
        strong = torch.stack([self.strong[self.pool[j]][0] for j in picks])
        return image, label, weak, strong, torch.tensor([self.truth[j] for j in picks])


@dataclass
class FixMatch:
    """FixMatch's unlabeled term for :func:`mpp.eval.finetune.finetune`: its items, its loss, its log."""

    settings: SemiSettings
    weak: Dataset
    strong: Dataset
    pool: list[int]
    truth: list[int]
    log_every: int = 10
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("seen", "kept", "known", "right"), 0.0))
    window: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("seen", "kept", "known", "right"), 0.0))

    @classmethod
    def of(cls, config: FinetuneConfig, session: Session, splits: Splits) -> FixMatch:
        """The pool of ``splits`` with FixMatch's views: weak = flip and a mild crop; strong = RandAugment + erasing."""
        f, semi = config.finetune, config.finetune.semi
        pool = unlabeled_pool(splits, semi.pool_limit, config.seed)
        enc = session.encoder
        common = {"in_chans": enc.in_chans, "hflip": f.hflip}
        weak_tf = finetune_transform(enc.img_size, session.mean, session.std, rand_augment=None, reprob=0.0,
                                     scale=(0.8, 1.0), **common)  # fmt: skip
        strong_tf = finetune_transform(enc.img_size, session.mean, session.std, reprob=max(f.reprob, 0.25),
                                       rand_augment=f.rand_augment or "rand-m9-mstd0.5-inc1",
                                       scale=(f.crop_scale_min, 1.0), **common)  # fmt: skip
        weak, strong = (session.splits(tf).train.dataset for tf in (weak_tf, strong_tf))  # type: ignore[attr-defined]
        targets = targets_of(splits.train.dataset)  # type: ignore[attr-defined]
        session.say(
            f"  semi-supervised: FixMatch over {len(pool)} unlabeled training images, mu {semi.mu}, threshold "
            f"{threshold_of(semi):g}, weight {semi.weight:g}{', aligned' if semi.align else ''}"
            f"{', EMA teacher' if semi.ema_teacher else ''}"
        )
        return cls(semi, weak, strong, pool, [targets[i] for i in pool], f.log_every)

    def items(self, labelled: Dataset) -> FixMatchItems:
        """What each training item is."""
        return FixMatchItems(labelled, self.weak, self.strong, self.pool, self.settings.mu, self.truth)

    def loss(self, model: Any, batch: Any, criterion: Any, device: torch.device, ema_model: Any | None) -> torch.Tensor:
        """Supervised loss + ``weight`` x masked cross-entropy of the strong views against the weak views' labels."""
        s = self.settings
        images, labels, weak, strong, truth = batch
        images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
        weak, strong = weak.flatten(0, 1).to(device), strong.flatten(0, 1).to(device)
        teacher = ema_model if s.ema_teacher and ema_model is not None else model
        with torch.no_grad():
            probs = teacher(weak).float().softmax(1)
        if s.align:  # this batch's mean prediction rescaled to uniform: no class takes the pool over
            probs = aligned_to_uniform(probs, across_processes=True)
        confidence, pseudo = probs.max(1)
        mask = (confidence >= threshold_of(s)).float()
        unlabeled = (F.cross_entropy(model(strong).float(), pseudo, reduction="none") * mask).mean()
        truth = truth.flatten().to(device)
        known = mask.bool() & (truth >= 0)
        for key, value in (("seen", mask.numel()), ("kept", mask.sum()), ("known", known.sum()),
                           ("right", (known & (pseudo == truth)).sum())):  # fmt: skip
            self.window[key] += float(value)
        return criterion(model(images), labels) + s.weight * unlabeled

    def on_step(self, then: Callable[[Any], None], run_dir: Path | None, accelerator: Any) -> Callable[[Any], None]:
        """The engine's ``on_step``: ``then`` (the EMA update), and every ``log_every`` steps a pseudo-label record."""

        def step(info: Any) -> None:
            then(info)
            if info.step % self.log_every:
                return
            w = self.window
            if accelerator.num_processes > 1:  # every process's share of the pool images, not the main's alone
                summed = accelerator.reduce(torch.tensor(list(w.values()), device=accelerator.device), "sum")
                w = dict(zip(w, summed.tolist(), strict=True))
            record = {"step": info.step, "stage": "semi", "mask_rate": round(w["kept"] / max(w["seen"], 1), 4),
                      "pseudo_accuracy": round(100 * w["right"] / w["known"], 2) if w["known"] else None}  # fmt: skip
            for key in self.counts:
                self.counts[key] += w[key]
            self.window = dict.fromkeys(self.window, 0.0)
            if run_dir is not None and accelerator.is_main_process:
                with (run_dir / "pseudo_labels.jsonl").open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if getattr(accelerator, "trackers", None):  # beside the loss curves (accuracy: log only, never trained on)
                numbers = {f"semi/{k}": v for k, v in record.items() if k not in ("step", "stage") and v is not None}
                accelerator.log(numbers, step=info.step)

        return step

    def summary(self) -> dict[str, Any]:
        """What results.json records (this session's steps: a resumed run's log has the rest)."""
        c = self.counts
        return {
            "method": "fixmatch",
            "pool": len(self.pool),
            "settings": vars(self.settings).copy(),
            "mask_rate": round(c["kept"] / max(c["seen"], 1), 4),
            "pseudo_accuracy": round(100 * c["right"] / c["known"], 2) if c["known"] else None,
        }


def describe(semi: SemiSettings) -> str:
    """One line of the settings."""
    return (
        f"self-training: {semi.rounds} rounds, threshold {threshold_of(semi):g}, "
        f"{'aligned' if semi.align else 'unaligned'}, per class {semi.per_class or 'growing'}"
    )
