"""The one training engine under every stage (pretraining, full linear probe, fine-tuning); it builds no model.

A stage describes its run with a :class:`Schedule` (:func:`plan_schedule`: effective batch, lr scaling, steps, the
few-label stretch), passes a ``loss_fn(model, batch) -> loss`` and a ``loader_for(epoch, skip_batches)``, and calls
:func:`fit`, which owns the rest: the :class:`TrainState`, mixed precision, gradient accumulation (no gradient sync
on inner micro-batches, a trailing partial group dropped), the lr set every optimiser step, clipping, a
non-finite-loss stop, per-step seeding of torch's RNG (drop path etc. replay exactly after a resume), one
metrics.jsonl schema plus TensorBoard (:class:`RunLog`), the progress bar, and checkpoints with exact resume
(:class:`Checkpointer`, :func:`resume_state`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from mpp.checkpoint import Checkpoint, newest_resumable, save_checkpoint
from mpp.config import ConfigError, from_dict, to_dict
from mpp.optim import absolute_lr, effective_batch, lr_at, set_lr
from mpp.runinfo import read_config
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state saved by :meth:`to_dict` (unknown keys ignored, so older checkpoints still load)."""
        return cls(**{k: data[k] for k in ("step", "epoch", "batch_in_epoch", "images_seen", "extra") if k in data})


@dataclass
class StepInfo:
    """What the loop reports after each optimiser step."""

    step: int
    epoch_float: float
    loss: torch.Tensor  # this process's mean loss of the step, still on the device (read it with LossWindow)
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
    """
    model.train()
    running: torch.Tensor | float = 0.0
    for batch in batches:
        micro = state.batch_in_epoch % accum_steps
        last_micro = micro == accum_steps - 1
        torch.manual_seed(mix_seed(seed, state.step, micro, accelerator.process_index))
        sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            accelerator.backward(loss / accum_steps)
        running = running + loss.detach().float()  # stays on the device: no host sync per step
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
        info = StepInfo(state.step, epoch_float, running / accum_steps, lr, images)  # type: ignore[arg-type]
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


# ------------------------------------------------------------------------------------------------ schedule
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

    @property
    def effective_batch(self) -> int:
        """Images per optimiser step."""
        return effective_batch(self.batch_size, self.accum_steps, self.world)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.steps_per_epoch * self.epochs

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches consumed per epoch per process (a trailing partial accumulation group is dropped)."""
        return self.steps_per_epoch * self.accum_steps

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch."""
        return lr_at(epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)

    def describe(self, key: str) -> str:
        """Two lines for the console: batch and lr arithmetic, then steps."""
        clipped = f" ({key}.batch_size clipped to the training set)" if self.batch_clipped else ""
        how = f" ({key}.lr set directly)" if self.lr_given else f" = blr {self.blr:g} x {self.effective_batch} / 256"
        return (f"  effective batch {self.effective_batch} = {self.batch_size} x {self.accum_steps} accum x "
                f"{self.world} procs{clipped}; lr {self.lr:.3g}{how}\n"
                f"  {self.steps_per_epoch} steps/epoch x {self.epochs} epochs = {self.total_steps} steps "
                f"(warmup {self.warmup_epochs:g} epochs)")  # fmt: skip


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
    min_steps = getattr(section, "min_steps", 0)
    if steps_per_epoch * epochs < min_steps:  # few labels: more epochs (and proportional warmup) to reach min_steps
        stretched = -(-min_steps // steps_per_epoch)
        epochs, warmup = stretched, warmup * stretched / section.epochs
    lr = section.lr if section.lr is not None else absolute_lr(section.blr, eff)
    return Schedule(batch, section.accum_steps, world, section.blr, lr, section.lr is not None, section.min_lr, epochs,
                    warmup, steps_per_epoch, batch < section.batch_size)  # fmt: skip


# ------------------------------------------------------------------------------------------------ logging
class RunLog:
    """One metrics.jsonl schema for every stage, plus TensorBoard when the accelerator has its tracker.

    Training records: ``{"step", "epoch", "loss", "lr", "images_per_s", "stage"}``; other records (the pretraining
    monitor) carry their own fields and ``stage``. Only the main process writes; the file is appended to, so a
    resumed run continues it.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path | None, stage: str) -> None:
        self.accelerator = accelerator
        self.stage = stage
        self.file = None
        if run_dir is not None and accelerator.is_main_process:
            self.file = open(Path(run_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.tensorboard = bool(getattr(accelerator, "trackers", None))

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append one record (``stage`` added) and send its numbers to TensorBoard under ``<stage>/``."""
        record = {**record, "stage": record.get("stage", self.stage)}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard:
            numbers = {f"{record['stage']}/{k}": v for k, v in record.items()
                       if k not in ("step", "stage") and isinstance(v, int | float)}  # fmt: skip
            self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self.file is not None:
            self.file.close()
            self.file = None


# ------------------------------------------------------------------------------------------------ checkpoints
class Checkpointer:
    """Saves the run at epoch ends (every ``every_epochs``, and the last) and every ``every_steps`` steps.

    ``extra_state`` adds tensors to the optimizer file (an EMA model, the AMP scaler); only the main process writes,
    everyone waits for it. ``writer(model, optimizer, state) -> path`` replaces all of that for state spread over the
    processes (FSDP's sharded checkpoints); every process calls it.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        keep: int = 2,
        every_steps: int = 0,
        every_epochs: int = 1,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        writer: Callable[[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]], Path | None] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.writer = writer
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.every_steps = every_steps
        self.every_epochs = max(1, every_epochs)
        self.extra_state = extra_state
        self.last_saved: dict[str, Any] | None = None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Path | None:
        """Write a checkpoint of the (unwrapped) model, the optimizer and ``state``; the path on the main process.

        A state just saved (a stop right after a ``every_steps`` checkpoint) is not written again.
        """
        path = None
        if state.to_dict() == self.last_saved:
            return None
        self.last_saved = state.to_dict()
        if self.writer is not None:
            return self.writer(model, optimizer, state.to_dict())
        if self.accelerator.is_main_process:
            model_state = self.accelerator.unwrap_model(model).state_dict()
            opt_state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
            if self.accelerator.scaler is not None:
                opt_state["scaler"] = self.accelerator.scaler.state_dict()
            if self.extra_state is not None:
                opt_state.update(self.extra_state())
            path = save_checkpoint(self.run_dir, state.step, model_state, opt_state, state.to_dict(), self.keep)
        self.accelerator.wait_for_everyone()
        return path


def resume_state(run_dir: Path, say: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads completely (``None`` for a fresh run), saying what was skipped.

    Raises:
        mpp.checkpoint.CheckpointError: checkpoints exist but none loads.
    """
    found = newest_resumable(run_dir) if Path(run_dir).is_dir() else None
    if found is not None:
        for name, reason in found.skipped:
            say(f"  skipped checkpoint {name}: {reason}")
    return found


def check_resumable(run_dir: Path, config: Any, free_keys: set[str], command: str) -> None:
    """Refuse to silently continue a run whose saved config differs in anything that changes the result.

    Args:
        run_dir: the run directory (its config.yaml is compared, top-level key by key, after filling keys a newer
            mpp added with their defaults).
        config: the new run's resolved config (a config dataclass).
        free_keys: keys that may differ (where the run lives, logging cadence, ...).
        command: how to continue the run as saved, for the message (``mpp pretrain --resume``).
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    wanted = to_dict(config)
    try:
        saved = to_dict(from_dict(type(config), read_config(saved_path)))
    except ConfigError:
        saved = read_config(saved_path)  # keys this version no longer knows: compare as written
    diffs = [k for k in sorted(set(saved) | set(wanted)) if k not in free_keys and saved.get(k) != wanted.get(k)]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpointed run with different settings ({', '.join(diffs)}); "
            f"use `{command} {run_dir}` to continue it, or choose another output_dir"
        )


def restore(found: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load a checkpoint into an unprepared model and optimizer; the trainer state to continue from."""
    model.load_state_dict(found.model_state)
    optimizer.load_state_dict(found.optimizer_state["optimizer"])
    return TrainState.from_dict(found.trainer_state)


def restore_scaler(found: Checkpoint | None, accelerator: Accelerator) -> None:
    """After ``accelerator.prepare``: the AMP scaler's state, when the run had one."""
    if found is not None and "scaler" in found.optimizer_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(found.optimizer_state["scaler"])


# ------------------------------------------------------------------------------------------------ fit
class LossWindow:
    """Step losses kept on the device and read (one host sync, one cross-process mean) only when needed.

    Reading happens at log steps, before every checkpoint and at epoch ends, so a GPU never waits for the host each
    step, and a non-finite loss still stops the run before any state that saw it is saved.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.pending: list[torch.Tensor] = []
        self.first_step = 0
        self.epoch_sum = 0.0
        self.epoch_count = 0

    def add(self, info: StepInfo) -> None:
        """Keep one step's loss."""
        if not self.pending:
            self.first_step = info.step
        self.pending.append(info.loss)

    def read(self, step: int) -> float | None:
        """Mean loss (over processes) of the steps since the last read; ``None`` if there were none.

        Raises:
            NonFiniteLossError: that mean is NaN or infinite.
        """
        if not self.pending:
            return None
        count = len(self.pending)
        local = torch.stack([t.reshape(()) for t in self.pending]).mean()
        mean = self.accelerator.reduce(local, reduction="mean").item()
        self.pending = []
        if not math.isfinite(mean):
            where = f"at step {step}" if count == 1 else f"in steps {self.first_step}-{step}"
            raise NonFiniteLossError(
                f"loss is {mean} {where}; stopping without saving. Lower the lr, enable optim.clip_grad, or use "
                "mixed_precision=bf16/no."
            )
        self.epoch_sum += mean * count
        self.epoch_count += count
        return mean

    def epoch_mean(self) -> float:
        """Mean loss of the epoch's read steps; resets for the next epoch."""
        value = self.epoch_sum / max(self.epoch_count, 1)
        self.epoch_sum, self.epoch_count = 0.0, 0
        return value


@dataclass
class FitHooks:
    """Optional stage callbacks: after each optimiser step, after each pass over an epoch (complete or stopped)."""

    on_step: Callable[[StepInfo], None] | None = None
    on_epoch_end: Callable[[TrainState], None] | None = None


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    schedule: Schedule,
    state: TrainState,
    loader_for: Callable[[int, int], Iterable[Any]],
    *,
    seed: int,
    log: RunLog | None = None,
    log_every: int = 10,
    clip_grad: float | None = None,
    checkpointer: Checkpointer | None = None,
    hooks: FitHooks | None = None,
    stop_at_step: int | None = None,
    progress: bool = False,
    bar_extra: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> bool:
    """Train from ``state`` to the end of the schedule (or ``stop_at_step``); ``True`` when all epochs are done.

    Args:
        accelerator: the run's accelerator (model and optimizer prepared by it).
        model: the prepared model (possibly compiled).
        optimizer: the prepared optimizer.
        loss_fn: the scalar loss of one micro-batch.
        schedule: from :func:`plan_schedule`.
        state: where the run is (fresh, or restored by :func:`restore`); advanced in place.
        loader_for: ``(epoch, skip_batches) -> this process's micro-batches`` for the rest of that epoch.
        seed: run seed (per-step RNG).
        log: metrics.jsonl / TensorBoard writer; a record every ``log_every`` steps and at the last step.
        log_every: steps between records.
        clip_grad: max gradient norm, or ``None``.
        checkpointer: saves at epoch ends and every ``every_steps``; also when stopped at ``stop_at_step``.
        hooks: stage callbacks.
        stop_at_step: stop (checkpointed) once this many steps are done.
        progress: show a progress bar (main process only).
        bar_extra: extra fields for the bar (a stage may update them from its hooks).
        say: where the per-epoch line goes (first, every tenth, and last epoch); ``None`` prints nothing.
    """
    hooks = hooks or FitHooks()
    bar_extra = bar_extra if bar_extra is not None else {}
    total = schedule.total_steps
    show = progress and accelerator.is_local_main_process
    bar = tqdm(total=total, initial=state.step, disable=not show, unit="step", dynamic_ncols=True)
    meter, epoch_meter = Throughput(), Throughput()
    losses = LossWindow(accelerator)
    stop = False

    def save() -> Path | None:
        assert checkpointer is not None
        losses.read(state.step)  # never save a state that has seen a non-finite loss
        return checkpointer.save(model, optimizer, state)

    def after_step(info: StepInfo) -> bool:
        nonlocal stop
        meter.update(info.images)
        epoch_meter.update(info.images)
        losses.add(info)
        bar.update(1)
        if hooks.on_step is not None:
            hooks.on_step(info)
        if info.step % log_every == 0 or info.step == total:
            loss = losses.read(info.step)
            record = {"step": info.step, "epoch": round(info.epoch_float, 4), "loss": loss, "lr": info.lr,
                      "images_per_s": round(meter.rate(), 2)}  # fmt: skip
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{info.lr:.2e}", img_s=f"{record['images_per_s']:.0f}",
                            **bar_extra)  # fmt: skip
            if log is not None:
                log.write(record, info.step)
        if checkpointer is not None and checkpointer.every_steps and info.step % checkpointer.every_steps == 0:
            save()
        stop = stop_at_step is not None and info.step >= stop_at_step
        return stop

    try:
        while state.epoch < schedule.epochs and not stop:
            if stop_at_step is not None and state.step >= stop_at_step:
                break
            usable = schedule.micro_batches_per_epoch - state.batch_in_epoch
            batches = (b for i, b in enumerate(loader_for(state.epoch, state.batch_in_epoch)) if i < usable)
            train_one_epoch(accelerator, model, optimizer, batches, loss_fn, state, lr_fn=schedule.lr_at,
                            steps_per_epoch=schedule.steps_per_epoch, accum_steps=schedule.accum_steps,
                            clip_grad=clip_grad, seed=seed, on_step=after_step)  # fmt: skip
            losses.read(state.step)
            if state.batch_in_epoch >= schedule.micro_batches_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                mean_loss = losses.epoch_mean()
                if say is not None and _worth_saying(state.epoch, schedule.epochs):
                    rate = epoch_meter.rate()
                    say(f"  epoch {state.epoch}/{schedule.epochs}: loss {mean_loss:.4f}, {rate:.0f} img/s")
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(state)
            epoch_done = state.batch_in_epoch == 0
            due = epoch_done and (state.epoch % checkpointer.every_epochs == 0 or state.epoch == schedule.epochs) \
                if checkpointer is not None else False  # fmt: skip
            if checkpointer is not None and (due or stop):
                path = save()
                if say is not None and path is not None and stop:
                    say(f"  stopped at step {state.step}: checkpoint {path}")
    finally:
        bar.close()
    return state.epoch >= schedule.epochs


def _worth_saying(epoch: int, epochs: int) -> bool:
    """The first, every tenth of the run, and the last epoch."""
    return epoch == 1 or epoch == epochs or epoch % max(1, epochs // 10) == 0
