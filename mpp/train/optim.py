"""Optimiser pieces shared by every stage: the lr scaling rule, the run's :class:`Schedule`, weight-decay groups.

The lr follows a linear warmup, then a half-cycle cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mpp.runtime import ConfigError


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


# The largest share of a budgeted run (optim.minutes / finetune.minutes) that warmup may take once the pace fixes its
# length; the paper warms up for 5% of its runs, the CPU recipes for 10-20%.
MAX_WARMUP_SHARE = 0.25


@dataclass
class Schedule:
    """How a run steps: per-process micro-batch, accumulation, processes, lr and its warmup + cosine, step counts."""

    batch_size: int
    accum_steps: int
    world: int
    blr: float
    lr: float
    lr_given: bool  # lr set directly rather than scaled from blr
    min_lr: float
    epochs: int
    warmup_epochs: float
    steps_per_epoch: int
    batch_clipped: bool = False  # the configured batch was larger than the training set allows
    minutes: float | None = None  # a wall-clock budget: mpp.train.budget fixes max_steps from the first steps' pace
    max_steps: int | None = None  # the run ends here, inside its last epoch (set by a budget)
    warmup_fraction: float | None = None  # set: a budget's cap makes warmup this share of the run (see plan_schedule)

    @property
    def effective_batch(self) -> int:
        """Images per optimiser step."""
        return effective_batch(self.batch_size, self.accum_steps, self.world)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        full = self.steps_per_epoch * self.epochs
        return full if self.max_steps is None else min(full, self.max_steps)

    @property
    def span_epochs(self) -> float:
        """The run's length in (fractional) epochs: where the cosine reaches ``min_lr``."""
        return self.total_steps / max(self.steps_per_epoch, 1)

    def cap(self, steps: int, warmup_epochs: float | None = None) -> None:
        """End the run after ``steps`` optimiser steps; the last epoch is cut short and the cosine ends there.

        The warmup shrinks with a short run, unless ``warmup_epochs`` fixes it (a budget's re-check, a resume).
        """
        self.max_steps = max(1, steps)
        self.epochs = -(-self.max_steps // self.steps_per_epoch)
        if warmup_epochs is not None:
            self.warmup_epochs = warmup_epochs
        elif self.warmup_fraction is not None:
            self.warmup_epochs = self.warmup_fraction * self.max_steps / self.steps_per_epoch
        else:  # a slow pace must not leave a budget mostly warmup (300 steps of 467 were: measured on a small folder)
            self.warmup_epochs = min(self.warmup_epochs, MAX_WARMUP_SHARE * self.max_steps / self.steps_per_epoch)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches consumed per epoch per process (a trailing partial accumulation group is dropped)."""
        return self.steps_per_epoch * self.accum_steps

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch."""
        return lr_at(epoch, self.lr, self.min_lr, self.warmup_epochs, self.span_epochs)

    def facts(self) -> dict[str, Any]:
        """What a stage's results record of its schedule: blr, lr, effective batch, epochs, warmup, steps."""
        return {
            "blr": self.blr,
            "lr": self.lr,
            "effective_batch": self.effective_batch,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "steps": self.total_steps,
        }

    def describe(self, key: str) -> str:
        """Two lines for the console: batch and lr arithmetic, then steps."""
        clipped = f" ({key}.batch_size clipped to the training set)" if self.batch_clipped else ""
        how = f" ({key}.lr set directly)" if self.lr_given else f" = blr {self.blr:g} x {self.effective_batch} / 256"
        return (
            f"  effective batch {self.effective_batch} = {self.batch_size} x {self.accum_steps} accum x "
            f"{self.world} procs{clipped}; lr {self.lr:.3g}{how}\n"
            f"  {self.steps_per_epoch} steps/epoch x {self.epochs} epochs = {self.total_steps} steps "
            f"(warmup {self.warmup_epochs:g} epochs)"
            + (f"; a {self.minutes:g}-minute budget sets the steps once the first are timed" if self.minutes else "")
        )


def plan_schedule(
    section: Any, dataset_size: int, world: int, key: str, *, clip_batch: bool = False, even_batch: bool = False
) -> Schedule:
    """The schedule of a config section (epochs, warmup_epochs, batch_size, accum_steps, blr, lr, min_lr, min_steps).

    Args:
        section: the stage's schedule section.
        dataset_size: training images.
        world: processes.
        key: the section's name, for messages (``optim``, ``probe``, ``finetune``).
        clip_batch: lower the batch to what a small (few-label) training set allows instead of failing.
        even_batch: keep the batch even (timm's Mixup pairs each image with its mirror in the batch).

    Raises:
        ConfigError: the data cannot fill one optimiser step.
    """
    batch = section.batch_size
    if clip_batch:
        batch = min(batch, dataset_size // world)
        batch -= batch % 2 if even_batch else 0
    if batch < (2 if clip_batch else 1):
        raise ConfigError(f"{dataset_size} training images cannot make a batch of 2 per process on {world} processes")
    micro = dataset_size // (batch * world)
    steps_per_epoch = micro // section.accum_steps
    eff = effective_batch(batch, section.accum_steps, world)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{key}.batch_size={section.batch_size}: {dataset_size} images give no full step of {eff} images "
            f"({world} processes x {section.accum_steps} accumulation); lower the batch size or {key}.accum_steps"
        )
    epochs, warmup = section.epochs, section.warmup_epochs
    minutes = getattr(section, "minutes", None)
    min_steps = getattr(section, "min_steps", 0)
    warmup_fraction = None
    if minutes:  # provisional: long enough for any budget until the pace is known (mpp.train.budget caps it)
        epochs = max(epochs, -(-1_000_000 // steps_per_epoch))
        if steps_per_epoch * section.epochs < min_steps:
            # Few labels: epochs of a step or two, so warmup_epochs means "this share of the run" (as min_steps
            # stretches it); in epochs it would be a fraction of one step once the budget fixes the length.
            warmup_fraction = section.warmup_epochs / section.epochs
    if steps_per_epoch * epochs < min_steps:  # few labels: more epochs (and proportional warmup) to reach min_steps
        stretched = -(-min_steps // steps_per_epoch)
        epochs, warmup = stretched, warmup * stretched / section.epochs
    lr = section.lr if section.lr is not None else absolute_lr(section.blr, eff)
    return Schedule(
        batch,
        section.accum_steps,
        world,
        section.blr,
        lr,
        section.lr is not None,
        section.min_lr,
        epochs,
        warmup,
        steps_per_epoch,
        batch < section.batch_size,
        minutes,
        warmup_fraction=warmup_fraction,
    )


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
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if exempt else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer),
            },
        )
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
