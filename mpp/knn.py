"""``mpp knn``: weighted cosine k-nearest-neighbour classification on frozen, pooled features (as DINO).

The training images (label budget applied) are the memory bank, the test images the queries. Each query takes its
``k`` most cosine-similar bank features; neighbour ``j`` votes for its class with weight ``exp(sim_j / T)``; the
class with the largest sum wins. Similarities are computed in blocks of queries, so a 60k bank and 10k queries need
only ``query_chunk x 60k`` floats at a time.

Usage::

    mpp knn runs/fmnist_tiny --recipe recipes/knn_fmnist.yaml
    mpp knn init=random model=mae_vit_tiny_patch4 labels_per_class=10 knn.k=20
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpp.eval_config import KnnConfig, KnnSettings
from mpp.metrics import classification_metrics
from mpp.models.classifier import ViTClassifier
from mpp.report import write_results
from mpp.stage import (
    budget_text,
    build_splits,
    encoder_description,
    eval_tf,
    extract_split_features,
    make_accelerator,
    move_to_grid,
    resolve_stats,
    results_header,
    run_dir_of,
    save_run_config,
    stage_encoder,
    stage_main,
)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 512,
) -> torch.Tensor:
    """Class votes of weighted cosine kNN.

    Args:
        bank: ``[M, D]`` memory features (normalised here).
        bank_labels: ``[M]`` their classes.
        queries: ``[Q, D]`` query features (normalised here).
        num_classes: ``C``.
        k: neighbours per query (capped at ``M``).
        temperature: ``T`` in the vote weight ``exp(sim / T)``.
        chunk: queries per similarity block.

    Returns:
        ``[Q, C]`` summed vote weights (argmax = prediction; top-5 from the ranking).
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    bank_t = bank.t().contiguous()
    out = torch.zeros(queries.shape[0], num_classes)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank_t  # [q, M]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        out[start : start + chunk].scatter_add_(1, bank_labels[top_idx], weights)
    return out


def knn_protocol(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    settings: KnnSettings,
) -> dict[str, Any]:
    """Run kNN on extracted features and measure it: the ``knn`` entry of results.json."""
    scores = knn_scores(train_feats, train_labels, test_feats, len(classes), settings.k, settings.temperature,
                        settings.query_chunk)  # fmt: skip
    entry = classification_metrics(scores, test_labels, classes)
    entry.update(k=settings.k, temperature=settings.temperature, bank_size=int(train_feats.shape[0]))
    entry["summary"] = f"k={settings.k}, T={settings.temperature}, bank {train_feats.shape[0]}"
    return entry


def run(config: KnnConfig) -> Path:
    """Extract features, classify the test split by kNN, write the results; returns the run directory."""
    encoder, meta = stage_encoder(config)
    move_to_grid(encoder, config)
    mean, std = resolve_stats(config, meta, encoder.in_chans)
    tf = eval_tf(config, encoder, mean, std)
    splits = build_splits(config, encoder, tf, tf)
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool)
    accelerator = make_accelerator(config)
    run_dir = run_dir_of(config, "knn")
    s = config.knn
    print(f"mpp knn: {encoder_description(encoder, meta, classifier.global_pool)} from {config.init}")
    print(f"  bank {len(splits.train)} train images ({budget_text(splits.label_info)}), {len(splits.test)} test "
          f"queries, k={s.k}, T={s.temperature}, on {accelerator.device}")  # fmt: skip
    save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
    d = config.data
    features = extract_split_features(classifier, splits, accelerator, d.batch_size, d.num_workers, config.progress)
    entry = knn_protocol(*features, splits.classes, s)
    results = results_header(config, encoder, meta, classifier.global_pool, splits)
    results["protocols"] = {"knn": entry}
    write_results(run_dir, results, splits.classes)
    print(f"  kNN top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {run_dir / 'results.json'}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp knn``."""
    return stage_main("mpp knn", KnnConfig, "Weighted cosine kNN on frozen encoder features.", run, argv)
