"""Multinomial logistic regression on features, its L2 strength chosen on validation images.

The raw-pixel baseline (:mod:`mpp.eval.baselines`) and the fine-tune head of LP-FT (:mod:`mpp.eval.lpft`) both fit it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # on standardised features, per image (the loss is a mean over images)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, iters: int = 100) -> torch.nn.Linear:
    """A multinomial logistic regression on ``x`` (already standardised), fitted by full-batch L-BFGS.

    The loss is the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (bias not penalised), a convex problem: L-BFGS with a
    strong-Wolfe line search reaches its optimum from zero weights, so the fit needs no seed.
    """
    model = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=iters,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=20,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def fit_on_raw(train: tuple[torch.Tensor, torch.Tensor], num_classes: int, l2: float) -> torch.nn.Linear:
    """:func:`fit_logistic` on ``train`` standardised per feature, the standardisation folded into the weights.

    The model then reads the raw features: ``W((x - m) / s) + b = (W / s) x + (b - (W / s) m)``.
    """
    x, y = train
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    model = fit_logistic((x - mean) / std, y, num_classes, l2)
    with torch.no_grad():
        model.weight.div_(std)
        model.bias.sub_(model.weight @ mean)
    return model


def chosen_logistic(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    l2_grid: Sequence[float] = L2_GRID,
) -> tuple[torch.nn.Linear, float, dict[float, float]]:
    """One :func:`fit_on_raw` per L2 of ``l2_grid``; the best on ``val`` kept.

    Returns:
        ``(the kept model, its L2, validation top-1 of every L2)``.
    """
    val_x, val_y = val
    fitted = {l2: fit_on_raw(train, num_classes, l2) for l2 in l2_grid}
    with torch.no_grad():
        val_top1 = {l2: 100.0 * (m(val_x).argmax(1) == val_y).float().mean().item() for l2, m in fitted.items()}
    best = max(l2_grid, key=lambda l2: (val_top1[l2], l2))  # ties: the stronger regularisation
    return fitted[best], best, val_top1
