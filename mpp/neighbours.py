"""Weighted cosine k-nearest-neighbour votes (as DINO), for ``mpp knn``, ``mpp evaluate`` and the pretraining monitor.

A maths leaf like :mod:`mpp.masking`: it imports only torch.

Each query takes its ``k`` most cosine-similar bank features; neighbour ``j`` votes for its class with weight
``exp(sim_j / T)``; the class with the largest sum wins. Similarities are computed in blocks of queries, so a 60k bank
and 10k queries need only ``chunk x 60k`` floats at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
