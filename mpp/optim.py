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


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; ``fused`` (one kernel for all parameters) defaults to on with CUDA, where it is fastest.

    The fused and the per-tensor implementations agree to float rounding (tested to 1e-6 after several steps).
    """
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def pretrain_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with the official groups: decay on weights of 2+ dims (tokens included), none on biases and norms.

    Frozen parameters (the fixed sin-cos tables) are left out by timm's grouping.
    """
    return adamw(param_groups_weight_decay(model, weight_decay), lr, betas, fused)


# ------------------------------------------------------------------------------------------------ fine-tuning
# Parameters the official fine-tuning exempts from weight decay besides every 1-D tensor (biases, norms).
VIT_NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


def vit_layer_id(name: str, depth: int) -> int:
    """The official MAE layer id of a ViT parameter for layer-wise lr decay.

    ``cls_token``, ``pos_embed`` and ``patch_embed.*`` are layer 0, ``blocks.i.*`` is layer ``i + 1``, everything
    else (final norm, ``fc_norm``, head) is layer ``depth + 1``. A leading ``encoder.`` (as in
    :class:`~mpp.models.classifier.ViTClassifier`) is ignored.
    """
    name = name.removeprefix("encoder.")
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    no_weight_decay: tuple[str, ...] = VIT_NO_WEIGHT_DECAY,
) -> list[dict]:
    """Parameter groups with layer-wise lr decay, as the official MAE fine-tuning.

    With ``num_layers = depth + 1``, a parameter of layer ``i`` (:func:`vit_layer_id`) gets
    ``lr_scale = layer_decay ** (num_layers - i)``; :func:`set_lr` multiplies the scheduled lr by it. 1-D tensors
    and the names in ``no_weight_decay`` (after stripping ``encoder.``) get no weight decay. Frozen parameters are
    left out.

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and a ``name`` such as ``layer_3_decay``.
    """
    num_layers = depth + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim == 1 or name.removeprefix("encoder.") in no_weight_decay
        layer = vit_layer_id(name, depth)
        key = f"layer_{layer}_{'no_decay' if exempt else 'decay'}"
        group = groups.setdefault(key, {
            "name": key, "params": [], "param_names": [], "weight_decay": 0.0 if exempt else weight_decay,
            "lr_scale": layer_decay ** (num_layers - layer),
        })  # fmt: skip
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ linear probe
def lars_param_groups(params: list[nn.Parameter], weight_decay: float = 0.0, **options: float) -> list[dict]:
    """Groups for the official MAE LARS: weights of 2+ dims are trust-ratio adapted and decayed; 1-D are not.

    timm's :class:`~timm.optim.Lars` adapts only when a group has weight decay unless ``always_adapt``; the probe
    trains with weight decay 0, so the adapted group sets ``always_adapt=True`` and the 1-D group (biases) gets
    plain momentum SGD, as in the official ``util/lars.py``. ``options`` (e.g. ``lr_scale``) go into both groups.
    """
    adapted = [p for p in params if p.requires_grad and p.ndim > 1]
    plain = [p for p in params if p.requires_grad and p.ndim <= 1]
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True, **options}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "always_adapt": False, **options})
    return groups


def lars_optimizer(
    groups: list[dict], lr: float, momentum: float = 0.9, trust_coeff: float = 0.001
) -> torch.optim.Optimizer:
    """LARS (timm's) with the official MAE probe's momentum 0.9 and trust coefficient 0.001."""
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coeff)
