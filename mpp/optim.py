"""Optimiser pieces shared by every stage: lr scaling rule, weight-decay groups, warmup + half-cycle cosine."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def effective_batch(batch_size: int, accum_steps: int, world_size: int) -> int:
    """Images per optimiser step: per-process batch x accumulation x processes."""
    return batch_size * accum_steps * world_size


def absolute_lr(blr: float, eff_batch: int) -> float:
    """The paper's linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * eff_batch / 256


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch: linear warmup from 0, then half-cycle cosine down to ``min_lr``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a per-group ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def pretrain_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW with the official groups: decay on weights of 2+ dims (tokens included), none on biases and norms.

    Frozen parameters (the fixed sin-cos tables) are left out by timm's grouping.
    """
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
