"""The training loop shared by every stage, on an accelerate ``Accelerator``; it builds no model and no data.

A stage passes a ``loss_fn(model, batch) -> loss`` and gets: mixed precision, gradient accumulation (without
gradient sync on the inner micro-batches), lr set every optimiser step from a schedule, optional clipping,
a non-finite-loss stop, and per-step seeding of torch's RNG (so drop path etc. replay exactly after a resume).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from mpp.optim import set_lr
from mpp.sampling import mix_seed


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before anything is saved from that state."""


@dataclass
class TrainState:
    """Where a run is: counted in optimiser steps; ``batch_in_epoch`` counts micro-batches consumed this epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for checkpoints."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "images_seen": self.images_seen, "extra": self.extra}  # fmt: skip


@dataclass
class StepInfo:
    """What the loop reports after each optimiser step."""

    step: int
    epoch_float: float
    loss: float
    lr: float
    images: int


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    state: TrainState,
    *,
    lr_fn: Callable[[float], float],
    steps_per_epoch: int,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    seed: int = 0,
    on_step: Callable[[StepInfo], bool | None] | None = None,
) -> bool:
    """Run the rest of one epoch.

    Args:
        accelerator: the run's accelerator (model and optimizer prepared by it).
        model: the (wrapped) model.
        optimizer: the (wrapped) optimizer.
        batches: this process's micro-batches for the remainder of the epoch.
        loss_fn: computes the scalar loss of one micro-batch.
        state: updated in place.
        lr_fn: lr at a fractional epoch.
        steps_per_epoch: optimiser steps in a full epoch (for the fractional epoch).
        accum_steps: micro-batches per optimiser step.
        clip_grad: max gradient norm, or ``None``.
        seed: run seed; torch's RNG is reseeded from (seed, step, micro-batch, rank) before each micro-batch.
        on_step: called after each optimiser step; returning ``True`` stops the epoch early.

    Returns:
        ``True`` if ``on_step`` asked to stop.

    Raises:
        NonFiniteLossError: the (process-averaged) loss is NaN or infinite.
    """
    model.train()
    running = 0.0
    for batch in batches:
        micro = state.batch_in_epoch % accum_steps
        last_micro = micro == accum_steps - 1
        torch.manual_seed(mix_seed(seed, state.step, micro, accelerator.process_index))
        sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            accelerator.backward(loss / accum_steps)
        mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"loss is {mean_loss} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch}); "
                "stopping without saving. Lower the lr, enable optim.clip_grad, or use mixed_precision=bf16/no."
            )
        running += mean_loss
        state.batch_in_epoch += 1
        if not last_micro:
            continue
        epoch_float = state.epoch + (state.batch_in_epoch // accum_steps) / max(steps_per_epoch, 1)
        lr = lr_fn(state.epoch + (state.batch_in_epoch // accum_steps - 1) / max(steps_per_epoch, 1))
        set_lr(optimizer, lr)
        if clip_grad is not None:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        images = _batch_len(batch) * accum_steps * accelerator.num_processes
        state.images_seen += images
        info = StepInfo(state.step, epoch_float, running / accum_steps, lr, images)
        running = 0.0
        if on_step is not None and on_step(info):
            return True
    return False


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0])


class Throughput:
    """Images per second over a sliding window of steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def update(self, images: int) -> None:
        """Count images of one step."""
        self.images += images

    def rate(self, reset: bool = True) -> float:
        """Images/s since the last reset."""
        now = time.perf_counter()
        value = self.images / max(now - self.start, 1e-9)
        if reset:
            self.start, self.images = now, 0
        return value
