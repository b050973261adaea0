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

from mpp import stage
from mpp.eval_config import KnnConfig, KnnSettings
from mpp.metrics import classification_metrics
from mpp.models.classifier import ViTClassifier
from mpp.report import write_results


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 512,
    device: torch.device | str | None = None,
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
        device: where the similarities are computed (the bank is moved there once); default the bank's.

    Returns:
        ``[Q, C]`` summed vote weights (argmax = prediction; top-5 from the ranking).
    """
    device = bank.device if device is None else device
    bank_t = F.normalize(bank.float().to(device), dim=1).t().contiguous()  # [D, M]
    bank_labels = bank_labels.to(device)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank_t.shape[1])
    out = torch.zeros(queries.shape[0], num_classes)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk].to(device) @ bank_t  # [q, M]
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        out[start : start + chunk] = votes.cpu()
    return out


def knn_protocol(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    settings: KnnSettings,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run kNN on extracted features and measure it: the ``knn`` entry of results.json."""
    scores = knn_scores(train_feats, train_labels, test_feats, len(classes), settings.k, settings.temperature,
                        settings.query_chunk, device)  # fmt: skip
    entry = classification_metrics(scores, test_labels, classes)
    entry.update(k=settings.k, temperature=settings.temperature, bank_size=int(train_feats.shape[0]))
    entry["summary"] = f"k={settings.k}, T={settings.temperature}, bank {train_feats.shape[0]}"
    return entry


def run(config: KnnConfig) -> Path:
    """Extract features, classify the test split by kNN, write the results; returns the run directory."""
    encoder, meta = stage.stage_encoder(config)
    stage.move_to_grid(encoder, config)
    mean, std = stage.resolve_stats(config, meta, encoder.in_chans)
    tf = stage.eval_tf(config, encoder, mean, std)
    splits = stage.build_splits(config, encoder, tf, tf)
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool, feature_blocks=config.feature_blocks)
    accelerator = stage.stage_accelerator(config)
    run_dir = stage.run_dir_of(config, "knn")
    s = config.knn
    say = accelerator.print
    say(f"mpp knn: {stage.encoder_description(encoder, meta, classifier.global_pool)} from {config.init}")
    say(f"  bank {len(splits.train)} train images ({stage.budget_text(splits.label_info)}), {len(splits.test)} test "
          f"queries, k={s.k}, T={s.temperature}, on {accelerator.device}")  # fmt: skip
    if accelerator.is_main_process:  # kNN is not split across processes: under accelerate launch, one writes
        stage.save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
    d = config.data
    features = stage.extract_split_features(
        classifier, splits, accelerator, d.batch_size, d.num_workers, config.progress
    )
    entry = knn_protocol(*features, splits.classes, s, accelerator.device)
    if accelerator.is_main_process:
        results = stage.results_header(config, encoder, meta, classifier.global_pool, splits)
        results["protocols"] = {"knn": entry}
        write_results(run_dir, results, splits.classes)
        say(f"  kNN top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {run_dir / 'results.json'}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp knn``."""
    return stage.stage_main("mpp knn", KnnConfig, "Weighted cosine kNN on frozen encoder features.", run, argv)
