"""``mpp knn``: weighted cosine k-nearest-neighbour classification on frozen, pooled features (as DINO).

The training images (label budget applied) are the memory bank, the test images the queries; the votes are
:func:`mpp.neighbours.knn_scores` (``k`` neighbours, weights ``exp(sim / T)``, queries in blocks of ``query_chunk``).

Usage::

    mpp knn runs/fmnist_tiny --recipe recipes/knn_fmnist.yaml
    mpp knn init=random model=mae_vit_tiny_patch4 labels_per_class=10 knn.k=20
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mpp.config import KnnConfig, KnnSettings
from mpp.config.command import command_main
from mpp.eval.features import split_features
from mpp.eval.metrics import classification_metrics
from mpp.eval.session import Session, budget_text
from mpp.models.classifier import ViTClassifier
from mpp.neighbours import knn_scores


def knn_protocol(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    settings: KnnSettings,
    device: torch.device | str | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Run kNN on extracted features and measure it: the ``knn`` entry of results.json.

    With ``val`` (validation features and labels) the entry also has ``val_top1``, the figure choices are made on.
    """
    s = settings

    def votes(queries: torch.Tensor) -> torch.Tensor:
        return knn_scores(train_feats, train_labels, queries, len(classes), s.k, s.temperature, s.query_chunk, device)

    entry = classification_metrics(votes(test_feats), test_labels, classes)
    if val is not None:
        entry["val_top1"] = 100.0 * (votes(val[0]).argmax(1) == val[1]).float().mean().item()
    entry.update(k=settings.k, temperature=settings.temperature, bank_size=int(train_feats.shape[0]))
    entry["summary"] = f"k={settings.k}, T={settings.temperature}, bank {train_feats.shape[0]}"
    return entry


def run(config: KnnConfig) -> Path:
    """Extract features, classify the test split by kNN, write the results; returns the run directory."""
    session = Session.open(config, "knn")
    splits = session.splits()
    classifier = ViTClassifier(
        session.encoder, splits.num_classes, config.global_pool, feature_blocks=config.feature_blocks
    )
    s, say = config.knn, session.say
    say(f"mpp knn: {session.describe(classifier.global_pool)} from {config.init}")
    say(
        f"  bank {len(splits.train)} train images ({budget_text(splits.label_info)}), {len(splits.test)} test "
        f"queries, k={s.k}, T={s.temperature}, on {session.accelerator.device}"
    )
    session.save_config(splits)  # kNN is not split across processes: under accelerate launch, one writes
    feats = split_features(classifier, splits, session.accelerator, config.data, config.progress)
    entry = knn_protocol(*feats.train, *feats.test, splits.classes, s, session.accelerator.device, val=feats.val)
    if written := session.write_results(splits, classifier.global_pool, {"knn": entry}):
        val = f" (validation {entry['val_top1']:.2f}%)" if "val_top1" in entry else ""
        say(f"  kNN top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}%{val} -> {written}")
    return session.run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp knn``."""
    return command_main("mpp knn", KnnConfig, "Weighted cosine kNN on frozen encoder features.", run, argv)
