"""Classification metrics from class scores: top-1, top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    index = target.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def topk_accuracy(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Percentage of rows whose true class is among the ``k`` highest scores (``k`` capped at the class count)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == target[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def classification_metrics(scores: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything a results file reports about one protocol on one test set.

    Args:
        scores: ``[N, C]`` logits, probabilities or kNN votes (higher = more likely).
        target: ``[N]`` true classes.
        class_names: ``C`` names.

    Returns:
        ``top1``, ``top5`` (percent; top-5 is over ``min(5, C)`` classes), ``per_class`` (name -> percent of that
        class's test images classified correctly; ``None`` for a class absent from the test set), ``confusion``
        (nested lists, rows = true class) and ``n``.
    """
    num_classes = len(class_names)
    if scores.shape[1] != num_classes:
        raise ValueError(f"scores have {scores.shape[1]} classes but {num_classes} class names were given")
    pred = scores.argmax(dim=1)
    confusion = confusion_matrix(pred, target, num_classes)
    support = confusion.sum(dim=1)
    per_class = {
        name: (100.0 * confusion[c, c].item() / support[c].item() if support[c] else None)
        for c, name in enumerate(class_names)
    }
    return {
        "top1": topk_accuracy(scores, target, 1),
        "top5": topk_accuracy(scores, target, 5),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "n": int(target.numel()),
    }
