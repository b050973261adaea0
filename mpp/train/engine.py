"""The one training engine under every stage (pretraining, full linear probe, fine-tuning); it builds no model.

A stage describes its run with a :class:`~mpp.train.optim.Schedule` (:func:`~mpp.train.optim.plan_schedule`:
effective batch, lr scaling, steps, the few-label stretch), passes a ``loss_fn(model, batch) -> loss`` and a
``loader_for(epoch, skip_batches)``, and calls :func:`fit`, which owns the rest: the
:class:`~mpp.train.checkpoint.TrainState`, mixed precision, gradient accumulation (no gradient sync on inner
micro-batches, a trailing partial group dropped), the lr set every optimiser step, clipping, a non-finite-loss stop,
per-step seeding of torch's RNG (drop path etc. replay exactly after a resume), one metrics.jsonl schema plus
TensorBoard (:class:`RunLog`), the progress bar, and checkpoints with exact resume (:mod:`mpp.train.checkpoint`).

Every stage starts the same way (:func:`prepare_run`: restore a checkpoint, ``accelerator.prepare``, the AMP scaler)
and reads images the same way (:func:`image_loader`); :func:`train_images` is the whole wiring of a stage that trains
on a labelled image dataset (full probe, fine-tuning).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset
from tqdm import tqdm

from mpp.data.sampling import EpochLoader, loader_workers, mix_seed
from mpp.data.skips import start_skip_log
from mpp.runtime import NonFiniteLossError, StopSignalError, one_line
from mpp.train.budget import STATE_KEY, BudgetPlan, StepTimer, steps_in_budget
from mpp.train.checkpoint import Checkpoint, Checkpointer, TrainState, restore, restore_scaler
from mpp.train.optim import Schedule, set_lr
from mpp.train.signals import StopSignals


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
    schedule: Schedule,
    clip_grad: float | None = None,
    seed: int = 0,
    *,
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
        schedule: the lr at a fractional epoch, optimiser steps per epoch, micro-batches per step.
        clip_grad: max gradient norm, or ``None``.
        seed: run seed; torch's RNG is reseeded from (seed, step, micro-batch, rank) before each micro-batch.
        on_step: called after each optimiser step; returning ``True`` stops the epoch early.

    Returns:
        ``True`` if ``on_step`` asked to stop.
    """
    model.train()
    accum_steps, steps_per_epoch = schedule.accum_steps, schedule.steps_per_epoch
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
        lr = schedule.lr_at(state.epoch + (state.batch_in_epoch // accum_steps - 1) / max(steps_per_epoch, 1))
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


# ------------------------------------------------------------------------------------------------ logging
class RunLog:
    """One metrics.jsonl schema for every stage, plus the accelerator's trackers (TensorBoard, W&B, MLflow, ...).

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
        self.tracked = bool(getattr(accelerator, "trackers", None))

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append one record (``stage`` added) and send its numbers to the trackers under ``<stage>/``."""
        record = {**record, "stage": record.get("stage", self.stage)}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tracked:
            numbers = {
                f"{record['stage']}/{k}": v
                for k, v in record.items()
                if k not in ("step", "stage") and isinstance(v, int | float)
            }
            self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self.file is not None:
            self.file.close()
            self.file = None


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
    # Once the pace is known (seconds per step, the schedule): the stage's other seconds per epoch (monitor readings),
    # which a budget leaves room for; the stage may set its own cadences from the pace here.
    on_pace: Callable[[float, Schedule], float] | None = None
    on_plan: Callable[[BudgetPlan], None] | None = None  # a budget fixed the step count (record it)


class _StepWatch:
    """What :func:`fit` does after each optimiser step: meters, the loss window, the bar, records, step checkpoints."""

    def __init__(
        self,
        accelerator: Accelerator,
        bar: tqdm,
        schedule: Schedule,
        log: RunLog | None,
        log_every: int,
        hooks: FitHooks,
        bar_extra: dict[str, str],
        save: Callable[[], Path | None],
        every_steps: int,
        stop_at_step: int | None,
    ) -> None:
        self.bar = bar
        self.meter, self.epoch_meter = Throughput(), Throughput()
        self.losses = LossWindow(accelerator)
        self.schedule, self.log, self.log_every, self.hooks = schedule, log, log_every, hooks
        self.bar_extra, self.save, self.every_steps, self.stop_at_step = bar_extra, save, every_steps, stop_at_step
        self.stop = False
        self.pacer: Callable[[int], None] | None = None
        self.accelerator = accelerator
        self.signals: StopSignals | None = None
        self.signal: int | None = None  # the stop signal that ended the run

    def __call__(self, info: StepInfo) -> bool:
        """Account for one step; ``True`` asks the epoch to stop (``stop_at_step`` or a budget's last step reached)."""
        self.meter.update(info.images)
        self.epoch_meter.update(info.images)
        self.losses.add(info)
        self.bar.update(1)
        if self.hooks.on_step is not None:
            self.hooks.on_step(info)
        if self.pacer is not None:
            self.pacer(info.step)
        if info.step % self.log_every == 0 or info.step == self.schedule.total_steps:
            loss = self.losses.read(info.step)
            record = {
                "step": info.step,
                "epoch": round(info.epoch_float, 4),
                "loss": loss,
                "lr": info.lr,
                "images_per_s": round(self.meter.rate(), 2),
            }
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{info.lr:.2e}", img_s=f"{record['images_per_s']:.0f}", **self.bar_extra
            )
            if self.log is not None:
                self.log.write(record, info.step)
        if self.every_steps and info.step % self.every_steps == 0:
            self.save()
        self.stop = self.stop_at_step is not None and info.step >= self.stop_at_step
        if self.signals is not None and (sig := self.signals.agreed(self.accelerator)):
            self.stop, self.signal = True, sig
        return self.stop or info.step >= self.schedule.total_steps


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
    started: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> bool:
    """Train from ``state`` to the end of the schedule (or ``stop_at_step``); ``True`` when all epochs are done.

    Args:
        accelerator: the run's accelerator (model and optimizer prepared by it).
        model: the prepared model (possibly compiled).
        optimizer: the prepared optimizer.
        loss_fn: the scalar loss of one micro-batch.
        schedule: from :func:`mpp.train.optim.plan_schedule`.
        state: where the run is (fresh, or restored by :func:`mpp.train.checkpoint.restore`); advanced in place.
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
        started: ``clock()`` when the run began (a budget counts from there); default: now.
        clock: seconds, for the pace of the first steps (:mod:`mpp.train.budget`; tests fake it).
    """
    hooks = hooks or FitHooks()
    started = clock() if started is None else started

    def save() -> Path | None:
        assert checkpointer is not None
        watch.losses.read(state.step)  # never save a state that has seen a non-finite loss
        return checkpointer.save(model, optimizer, state)

    every_steps = (checkpointer.every_steps or 0) if checkpointer is not None else 0
    extra = bar_extra if bar_extra is not None else {}  # the caller's dict: its later updates show on the bar
    show = progress and accelerator.is_local_main_process
    bar = tqdm(total=schedule.total_steps, initial=state.step, disable=not show, unit="step", dynamic_ncols=True)
    watch = _StepWatch(accelerator, bar, schedule, log, log_every, hooks, extra, save, every_steps, stop_at_step)
    watch.pacer = _pacer(accelerator, schedule, state, hooks, bar, say, started, clock)
    with StopSignals() as signals:  # the first stop signal only ends the step (mpp.train.signals)
        watch.signals = signals
        try:
            while state.step < schedule.total_steps and not watch.stop:
                if stop_at_step is not None and state.step >= stop_at_step:
                    break
                usable = min(
                    schedule.micro_batches_per_epoch - state.batch_in_epoch,
                    (schedule.total_steps - state.step) * schedule.accum_steps,
                )
                batches = (b for i, b in enumerate(loader_for(state.epoch, state.batch_in_epoch)) if i < usable)
                train_one_epoch(
                    accelerator, model, optimizer, batches, loss_fn, state, schedule, clip_grad, seed, on_step=watch
                )
                watch.losses.read(state.step)
                if state.batch_in_epoch >= schedule.micro_batches_per_epoch or state.step >= schedule.total_steps:
                    _close_epoch(state, schedule, watch, say)  # a budget's last epoch ends where its steps do
                if hooks.on_epoch_end is not None:
                    hooks.on_epoch_end(state)
                due = checkpointer is not None and state.batch_in_epoch == 0 and checkpointer.due(state.epoch, schedule)
                if checkpointer is not None and (due or watch.stop):
                    path = save()
                    if say is not None and path is not None and watch.stop and watch.signal is None:
                        say(f"  stopped at step {state.step}: checkpoint {path}")
        finally:
            watch.bar.close()

    if watch.signal is not None:
        name = signal.Signals(watch.signal).name
        saved = "no run directory, nothing saved"
        if checkpointer is not None:
            where = checkpointer.run_dir
            saved = f"checkpoint in {where / 'checkpoints'}; run the same command again (or --resume {where})"
        raise StopSignalError(f"stopped by {name} after step {state.step}: {saved}", 128 + watch.signal)
    return state.step >= schedule.total_steps


def _agreed_max(accelerator: Accelerator, value: float) -> float:
    """The largest of every process's ``value``."""
    return accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).max().item()


def _pacer(
    accelerator: Accelerator,
    schedule: Schedule,
    state: TrainState,
    hooks: FitHooks,
    bar: tqdm,
    say: Callable[[str], None] | None,
    started: float,
    clock: Callable[[], float],
) -> Callable[[int], None] | None:
    """What :func:`fit` does once the first steps are timed: the stage's cadences (``on_pace``), a budget's steps.

    A resumed budget run restores the step count its state recorded and times nothing. ``None``: nothing to time.
    """
    planned = state.extra.get(STATE_KEY) if schedule.minutes else None
    if planned is not None:
        schedule.cap(planned["total_steps"], planned.get("warmup_epochs"))
        bar.total = schedule.total_steps
        if hooks.on_pace is not None:
            hooks.on_pace(planned["seconds_per_step"], schedule)
        return None
    if not schedule.minutes and hooks.on_pace is None:
        return None
    timer = StepTimer(state.step, clock)
    first: dict[str, Any] = {}  # the plan, once made: when, at which step, and the re-check's step

    def pace(step: int) -> None:
        if first and step == first["recheck_at"]:
            recheck(step)
            return
        local = timer.tick(step)
        if local is None:
            return
        # every process must stop at the same step: the slowest pace, the main process's monitor decide
        seconds = _agreed_max(accelerator, local)
        extra = _agreed_max(accelerator, hooks.on_pace(seconds, schedule) if hooks.on_pace is not None else 0.0)
        if not schedule.minutes:
            return
        elapsed = clock() - started
        total = steps_in_budget(schedule.minutes, elapsed, step, seconds, schedule.steps_per_epoch, extra)
        plan = BudgetPlan(schedule.minutes, seconds, elapsed, extra, total)
        schedule.cap(total)
        plan.warmup_epochs = schedule.warmup_epochs
        state.extra[STATE_KEY] = plan.to_dict()
        bar.total = schedule.total_steps
        if say is not None:
            warmup = round(schedule.warmup_epochs * schedule.steps_per_epoch)
            say(f"{plan.describe(schedule.steps_per_epoch)}; warmup {warmup} steps")
        if hooks.on_plan is not None:
            hooks.on_plan(plan)
        first.update(plan=plan, at=step, time=clock(), recheck_at=plan.recheck_at(step))

    def recheck(step: int) -> None:
        # every process re-fixes at the same step, from the slowest one's time
        plan: BudgetPlan = first["plan"]
        now = clock()
        since, elapsed = (_agreed_max(accelerator, t) for t in (now - first["time"], now - started))
        plan.recheck(step, since, elapsed, schedule.steps_per_epoch, first["at"])
        schedule.cap(plan.total_steps, plan.warmup_epochs)  # the warmup is under way or done: it stays
        state.extra[STATE_KEY] = plan.to_dict()
        bar.total = schedule.total_steps
        if say is not None:
            say(plan.describe_recheck(schedule.steps_per_epoch))
        if hooks.on_plan is not None:
            hooks.on_plan(plan)

    return pace


def _close_epoch(state: TrainState, schedule: Schedule, watch: _StepWatch, say: Callable[[str], None] | None) -> None:
    """Count a completed epoch; its line (loss, images/s) for the first, every tenth and the last epoch."""
    state.epoch += 1
    state.batch_in_epoch = 0
    mean_loss = watch.losses.epoch_mean()
    if say is not None and _worth_saying(state.epoch, schedule.epochs):
        rate = watch.epoch_meter.rate()
        say(f"  epoch {state.epoch}/{schedule.epochs}: loss {mean_loss:.4f}, {rate:.0f} img/s")


def _worth_saying(epoch: int, epochs: int) -> bool:
    """The first, every tenth of the run, and the last epoch."""
    return epoch == 1 or epoch == epochs or epoch % max(1, epochs // 10) == 0


# ------------------------------------------------------------------------------------------------ stage wiring
def prepare_run(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, found: Checkpoint | None
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState]:
    """Restore ``found`` (if any) into the unprepared model and optimizer, prepare both, restore the AMP scaler."""
    state = restore(found, model, optimizer) if found is not None else TrainState()
    prepared, optimizer = accelerator.prepare(model, optimizer)
    restore_scaler(found, accelerator)
    return prepared, optimizer, state


def image_loader(dataset: Dataset, schedule: Schedule, accelerator: Accelerator, data: Any, seed: int) -> EpochLoader:
    """``loader_for(epoch, skip)`` over an image dataset: this process's share of every epoch, in seeded order.

    ``data`` is the stage's data section (``num_workers``, ``persistent_workers``, ``prefetch_factor``); small
    (few-label) epochs load in the main process (:func:`mpp.data.sampling.loader_workers`).
    """
    images = schedule.micro_batches_per_epoch * schedule.batch_size * schedule.world
    return EpochLoader(
        dataset,
        schedule.batch_size,
        rank=accelerator.process_index,
        world_size=schedule.world,
        seed=seed,
        num_workers=loader_workers(data.num_workers, images),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=data.persistent_workers,
        prefetch_factor=data.prefetch_factor,
    )


@dataclass
class StageRun:
    """Where and how a labelled-image stage trains.

    Its config (``seed``, ``progress``, ``data``), name, accelerator, run directory (``None``: no log, no checkpoints),
    the checkpoint it resumes from, and where it speaks.
    """

    config: Any
    stage: str
    accelerator: Accelerator
    run_dir: Path | None
    found: Checkpoint | None = None
    say: Callable[[str], None] = print


def train_images(
    run: StageRun,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    schedule: Schedule,
    train: Dataset,
    *,
    log_every: int = 10,
    clip_grad: float | None = None,
    on_prepared: Callable[[torch.nn.Module, Checkpoint | None], None] | None = None,
    hooks: FitHooks | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> torch.nn.Module:
    """Train a labelled-image stage (full probe, fine-tuning) with :func:`fit`; the trained, unwrapped model.

    Restores ``run.found`` first, logs to ``run.run_dir``/metrics.jsonl and checkpoints there about ten times per run
    (when there is a run directory), so the stage resumes exactly after a crash like pretraining does.
    """
    config, accelerator, run_dir, found, say = run.config, run.accelerator, run.run_dir, run.found, run.say
    prepared, optimizer, state = prepare_run(accelerator, model, optimizer, found)
    raw = accelerator.unwrap_model(prepared)
    if on_prepared is not None:
        on_prepared(raw, found)
    loader_for = image_loader(train, schedule, accelerator, config.data, config.seed)
    log = RunLog(accelerator, run_dir, run.stage)
    checkpointer = None
    if run_dir is not None:
        if skipped := start_skip_log(train, run_dir, write=accelerator.is_main_process):
            say(skipped)
        checkpointer = Checkpointer(accelerator, run_dir, per_run=10, extra_state=extra_state)
    try:
        fit(
            accelerator,
            prepared,
            optimizer,
            loss_fn,
            schedule,
            state,
            loader_for,
            seed=config.seed,
            log=log,
            log_every=log_every,
            clip_grad=clip_grad,
            checkpointer=checkpointer,
            hooks=hooks,
            progress=config.progress,
            say=say,
        )
    finally:
        log.close()
    return raw


def compile_model(
    model: torch.nn.Module, trial: Callable[[torch.nn.Module], torch.Tensor], backend: str, say: Callable[[str], None]
) -> torch.nn.Module:
    """``torch.compile(model)``, tried on one real forward + backward first; the eager model when that fails.

    Compilation happens lazily at the first call, so a missing compiler, an unsupported op or a bad backend would
    otherwise stop the run at its first step. The trial's gradients are cleared and no optimizer step is taken, so
    the weights and the run's randomness (reseeded every step) are untouched.

    Args:
        model: the prepared model.
        trial: runs the (compiled) model on a batch and returns a scalar loss.
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` traces without generating code).
        say: where the one-line note goes.

    Returns:
        The compiled model, or ``model`` itself.
    """
    try:
        compiled = torch.compile(model, backend=backend)
        trial(compiled).backward()
    except Exception as err:  # noqa: BLE001 - any compiler failure means: train eagerly, say why
        say(f"  torch.compile ({backend}) failed, training without it: {one_line(err)[:300]}")
        return model
    finally:
        model.zero_grad(set_to_none=True)
    say(f"  torch.compile ({backend}): compiled")
    return compiled
