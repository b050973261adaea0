"""``mpp pretrain``: MAE pretraining on a dataset or image folder, from one CPU to many GPUs, exactly resumable.

Usage::

    mpp pretrain --recipe recipes/fmnist_tiny.yaml optim.epochs=20 output_dir=runs/fm
    mpp pretrain --resume runs/fm                       # continue a stopped run (also automatic)
    accelerate launch --multi_gpu --num_processes 8 -m mpp pretrain --recipe recipes/mae_vit_base_1600ep.yaml

The run reads its images through :mod:`mpp.data.pretraining`, trains with the engine every stage shares
(:func:`mpp.train.engine.prepare_run`, :func:`mpp.train.engine.fit`), watches itself with the kNN monitor
(:mod:`mpp.train.monitor`) and reconstruction pictures, and ends with the encoder file the evaluation stages read.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from mpp.config import ConfigError, PretrainConfig, model_overrides, to_dict
from mpp.config.command import command_main
from mpp.data.pretraining import PretrainData, build_pretrain_data
from mpp.data.skips import SKIPPED_FILES, decode_skips, start_skip_log
from mpp.formats.native import save_encoder, save_mae
from mpp.models import MaskedAutoencoder, create_model
from mpp.models.registry import model_config
from mpp.runtime import (
    NonFiniteLossError,
    atomic_write_json,
    check_output_dir,
    make_accelerator,
    seed_everything,
    write_config,
)
from mpp.train.budget import BudgetPlan
from mpp.train.checkpoint import Checkpoint, Checkpointer, TrainState, check_resumable, resume_state
from mpp.train.engine import FitHooks, RunLog, compile_model, fit, prepare_run
from mpp.train.fsdp import PlainCopy, load_sharded, save_sharded, shard_model
from mpp.train.lock import LOCK, RunDirLock
from mpp.train.monitor import KnnMonitor, MonitorRun, previous_random_reading
from mpp.train.optim import Schedule, plan_schedule, pretrain_optimizer
from mpp.train.trackers import flat_hparams, log_picture, make_trackers, parse_trackers, start_trackers
from mpp.viz.reconstruction import save_reconstruction_grid

# Settings that may differ between a run and its resumption without changing the result.
# The monitor only reads the model (eval mode, no RNG), so its settings are free too.
# Where the run lives (output_dir) is not a setting: a moved, copied or differently spelled run dir resumes.
RESUME_FREE_KEYS = {
    "output_dir",
    "stop_at_step",
    "progress",
    "log_every",
    "keep_checkpoints",
    "checkpoint_every_steps",
    "monitor",
    "resume_any_world",
    "trackers",  # where the curves go, not what is trained
}


CHECKPOINTS_PER_RUN = 20  # epoch-end checkpoints and pictures of a run without checkpoint_every_epochs


def build_mae(config: PretrainConfig) -> MaskedAutoencoder:
    """The MAE described by ``config.model``."""
    return create_model(config.model.name, **model_overrides(config.model))


def announce(
    say: Callable[[str], None],
    config: PretrainConfig,
    model: MaskedAutoencoder,
    data: PretrainData,
    accelerator: Accelerator,
    schedule: Schedule,
    measured: str | None = None,
) -> dict[str, Any]:
    """Print what the run will do (``measured``: the data's fingerprint); the derived numbers for config.yaml."""
    visible = model.visible_tokens
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"mpp pretrain: {config.model.name} ({params / 1e6:.2f}M trainable) on {config.data.source} "
        f"({len(data.samples)} images), {schedule.world} process(es) on {accelerator.device}, "
        f"precision {'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision}"
    )
    say(schedule.describe("optim"))
    if measured is not None:
        say(f"  data fingerprint: {measured}")
    say(
        f"  encoder sees {visible} of {model.num_patches + model.num_prefix_tokens} tokens per image, "
        f"{visible * schedule.effective_batch} per step"
    )
    if data.in_memory:
        say("  data: decoded once into memory, batches augmented in the training process")
    else:
        say(f"  data: {config.data.num_workers} loader worker(s) decoding and augmenting each image")
    return {
        "world_size": schedule.world,
        "effective_batch": schedule.effective_batch,
        "lr": schedule.lr,
        "dataset_size": len(data.samples),
        "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps,
        "encoder_tokens_per_step": visible * schedule.effective_batch,
        "mean": list(data.mean),
        "std": list(data.std),
        "params": params,
        "in_memory": data.in_memory,
    }


@dataclass
class ReconPictures:
    """A fixed batch of training images and masks, drawn after every epoch and at the end."""

    run_dir: Path
    imgs: torch.Tensor
    noise: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, run_dir: Path, data: PretrainData, model: MaskedAutoencoder, count: int, seed: int) -> ReconPictures:
        """The first ``count`` plain images and seeded masking noise."""
        imgs = torch.stack([data.plain[i][0] for i in range(min(count, len(data.plain)))])
        noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed))
        return cls(run_dir, imgs, noise, data.mean, data.std)

    def draw(self, model: MaskedAutoencoder, name: str, device: torch.device) -> Path:
        """Write ``recon/<name>``."""
        return save_reconstruction_grid(
            self.run_dir / "recon" / name, model, self.imgs.to(device), self.mean, self.std, noise=self.noise.to(device)
        )


FINGERPRINTED = ("folder", "shards", "hf")  # files: the defaults know nothing of them


def fingerprint_run(config: PretrainConfig, run_dir: Path) -> str | None:
    """A folder, shards or hf split's fingerprint (cached; copied to ``fingerprint.json``); its mean/std normalise.

    Returns the console line, or ``None`` for sources with known statistics and streams (never decoded up front).
    """
    d = config.data
    if d.source not in FINGERPRINTED or d.streaming:
        return None
    from mpp.data.fingerprint import fingerprint_of

    fp, cached = fingerprint_of(d, config.seed)
    if os.environ.get("RANK", "0") == "0":
        atomic_write_json(run_dir / "fingerprint.json", fp.to_dict())
    line = fp.describe() + (" [cached]" if cached else "")
    if d.mean is None:
        in_chans = model_config(config.model.name, **model_overrides(config.model)).get("in_chans", 3)
        mean, std = fp.stats(in_chans)
        d.mean, d.std = list(mean), list(std)
        line += "; normalised with its measured mean/std"
    return line


def run_precision(
    config: PretrainConfig, model: MaskedAutoencoder, data: PretrainData, run_dir: Path, found: Checkpoint | None
) -> tuple[str, str | None]:
    """The precision to run in, and why when ``auto`` chose it on a CPU (:mod:`mpp.train.precision`).

    A resumed run keeps the precision its config.yaml recorded; several CPU processes skip the trial (they could
    disagree) and run fp32.
    """
    if config.mixed_precision != "auto" or (torch.cuda.is_available() and not config.cpu):
        return config.mixed_precision, None
    if found is not None:
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()).get("_run", {})
        except (OSError, yaml.YAMLError, AttributeError):
            saved = {}
        if saved.get("precision"):
            return saved["precision"], f"{saved['precision']} as the run started ({saved.get('precision_reason')})"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "no", "fp32: several CPU processes (the bf16 trial runs for one)"
    from mpp.train.precision import choose_cpu_precision

    count = min(config.optim.batch_size, len(data.plain))  # the run's own batch: small ones hide bf16's gain
    imgs = torch.stack([data.plain[i][0] for i in range(count)])
    noise = torch.rand(count, model.num_patches, generator=torch.Generator().manual_seed(config.seed))
    precision, reason, _ = choose_cpu_precision(model, lambda: model(imgs, noise=noise).loss)
    return precision, reason


def check_same_world(run_dir: Path, world: int, config: PretrainConfig) -> None:
    """Refuse to resume on another process count (the effective batch, lr and steps per epoch would change).

    Raises:
        ConfigError: one line naming both counts and the option that forces it.
    """
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()).get("_run", {}).get("world_size")
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if saved in (None, world) or config.resume_any_world:
        return
    eff = config.optim.batch_size * config.optim.accum_steps
    raise ConfigError(
        f"{run_dir} was trained on {saved} process(es) and is resumed on {world}: the effective batch would change "
        f"from {eff * saved} to {eff * world} (lr and steps per epoch with it); resume on {saved} process(es), or set "
        "resume_any_world=true to continue anyway as a different run"
    )


def open_run(config: PretrainConfig) -> tuple[Path, Checkpoint | None]:
    """The run directory (created) and the checkpoint an interrupted run there continues from (``None``: fresh)."""
    run_dir = check_output_dir(Path(config.output_dir))
    found = resume_state(run_dir)
    if found is not None:
        check_resumable(run_dir, config, RESUME_FREE_KEYS, "mpp pretrain --resume")
    return run_dir, found


def run(config: PretrainConfig) -> Path:
    """Pretrain; returns the run directory. Raises ``NonFiniteLossError`` if the loss diverges."""
    started = time.perf_counter()  # a budget (optim.minutes) counts from here
    fresh = not Path(config.output_dir).exists()
    run_dir = check_output_dir(Path(config.output_dir))
    try:
        with RunDirLock(run_dir):  # one run per directory; released however the run ends
            return train(config, started)
    except Exception:
        if fresh and all(p.name == LOCK for p in run_dir.iterdir()):  # bad data found before anything was written
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def train(config: PretrainConfig, started: float) -> Path:
    """:func:`run` under the run directory's lock."""
    # before the resume check: the measured mean/std are part of the settings the run was started with
    measured = fingerprint_run(config, Path(config.output_dir))
    run_dir, found = open_run(config)
    seed_everything(config.seed)  # before the model, so its initial weights are the seed's
    model = build_mae(config)
    head = max(config.monitor.samples if config.monitor.enabled else 0, config.viz_samples, 1)
    data = build_pretrain_data(config.data, config.seed, model, head)
    precision, precision_note = run_precision(config, model, data, run_dir, found)
    trackers = make_trackers(parse_trackers(config.trackers), run_dir)
    accelerator = make_accelerator(precision, config.cpu, log_with=trackers or None, project_dir=str(run_dir))
    say, main = accelerator.print, accelerator.is_main_process
    if found is not None:
        check_same_world(run_dir, accelerator.num_processes, config)
    schedule = plan_schedule(config.optim, len(data.samples), accelerator.num_processes, "optim")
    derived = announce(say, config, model, data, accelerator, schedule, measured)
    if precision_note:
        say(f"  precision: {precision_note}")
        derived.update(precision=precision, precision_reason=precision_note)
    if main:
        write_config(run_dir / "config.yaml", to_dict(config), **derived)
    if skipped := start_skip_log(data.samples, run_dir, write=main):
        say(skipped)
    accelerator.wait_for_everyone()

    model, optimizer, state, view, sharded = start_model(config, model, accelerator, found, schedule.lr)
    raw: MaskedAutoencoder = accelerator.unwrap_model(model)  # sharded: its attributes only, no forward on one rank
    start_trackers(accelerator, run_dir, flat_hparams(to_dict(config)))
    log = RunLog(accelerator, run_dir, "pretrain")
    pictures = ReconPictures.of(run_dir, data, raw, config.viz_samples, config.seed)
    watch = monitor_run(config, data, raw, run_dir, resumed=found is not None, main=main, say=say)
    loss_fn = masked_loss(accelerator)
    loader_for = data.loader_for(config.data, schedule, accelerator, config.seed)
    train_model = maybe_compile(config, model, loader_for, state, loss_fn, accelerator)

    start = time.perf_counter()
    if state.step == 0:
        shown = view.sync()
        if main:
            watch.read(shown, accelerator, 0, 0.0, log, say)  # random init: what every later reading is compared with
    accelerator.wait_for_everyone()

    checkpointer = make_checkpointer(config, accelerator, run_dir, sharded)
    hooks = FitHooks(
        on_epoch_end=epoch_end_hook(view, pictures, watch, log, accelerator, checkpointer, schedule),
        on_pace=watch.pace if main else lambda seconds, schedule: 0.0,
        on_plan=record_plan(run_dir, config, derived) if main else None,
    )
    try:
        finished = fit(
            accelerator,
            train_model,
            optimizer,
            loss_fn,
            schedule,
            state,
            loader_for,
            seed=config.seed,
            log=log,
            log_every=config.log_every,
            clip_grad=config.optim.clip_grad,
            checkpointer=checkpointer,
            hooks=hooks,
            stop_at_step=config.stop_at_step,
            progress=config.progress,
            bar_extra=watch.bar_extra,
            say=say,
            started=started,
        )
    except NonFiniteLossError:
        accelerator.end_training()
        raise
    finally:
        log.close()
    report_session(run_dir, watch, time.perf_counter() - start, say)
    if finished:
        shown = view.sync()
        if main:
            export_weights(run_dir, shown, config, data, state, pictures, say, accelerator.device)
            log_picture(accelerator, "pretrain/reconstruction", run_dir / "recon" / "final.png", state.step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def start_model(
    config: PretrainConfig, model: MaskedAutoencoder, accelerator: Accelerator, found: Checkpoint | None, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState, PlainCopy, bool]:
    """The prepared (or, with ``fsdp``, sharded) model and optimizer restored from ``found``, and its plain view.

    Returns:
        ``(model, optimizer, state, view, sharded)``: ``view`` is the whole model for pictures and the monitor.
    """
    say = accelerator.print
    sharded = config.fsdp and accelerator.num_processes > 1
    if config.fsdp and not sharded:
        say("  fsdp: one process, nothing to shard; the model is trained whole")
    if found is not None and found.sharded is not None and not sharded:
        raise ConfigError(f"{found.path} is a sharded (fsdp=true) checkpoint; resume it with fsdp=true on >1 process")
    if sharded:
        prepared, optimizer, state, view = prepare_sharded(config, model, accelerator, found, lr)
    else:
        o = config.optim
        optimizer = pretrain_optimizer(model, lr, o.weight_decay, (o.betas[0], o.betas[1]), o.fused)
        prepared, optimizer, state = prepare_run(accelerator, model, optimizer, found)
        view = PlainCopy(None, accelerator.unwrap_model(prepared))
    if found is not None:
        say(f"  resumed from {found.path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return prepared, optimizer, state, view, sharded


def monitor_run(
    config: PretrainConfig,
    data: PretrainData,
    raw: MaskedAutoencoder,
    run_dir: Path,
    resumed: bool,
    main: bool,
    say: Callable[[str], None] = print,
) -> MonitorRun:
    """The kNN monitor of this session (on the main process), with the random-init reading of a resumed run."""
    previous = previous_random_reading(run_dir / "metrics.jsonl") if resumed else None
    return MonitorRun(
        build_monitor(config, data.plain) if main else None,
        config.monitor.every_epochs,
        config.optim.epochs,
        raw.global_pool if raw.cls_token is not None else "avg",
        previous[0] if previous else None,
        max_share=config.monitor.max_share,
        reading_s=previous[1] if previous else None,
        say=say,
    )


def record_plan(run_dir: Path, config: PretrainConfig, derived: dict[str, Any]) -> Callable[[BudgetPlan], None]:
    """``on_plan``: config.yaml gets the budget's arithmetic and the step count it fixed."""

    def on_plan(plan: BudgetPlan) -> None:
        derived.update(total_steps=plan.total_steps, budget=plan.to_dict())
        write_config(run_dir / "config.yaml", to_dict(config), **derived)

    return on_plan


def make_checkpointer(config: PretrainConfig, accelerator: Accelerator, run_dir: Path, sharded: bool) -> Checkpointer:
    """Whole-model checkpoints every epoch (and ``checkpoint_every_steps``), or FSDP's sharded ones."""

    def write_shards(m: torch.nn.Module, opt: torch.optim.Optimizer, trainer: dict[str, Any]) -> Path | None:
        return save_sharded(accelerator, run_dir, m, opt, trainer, config.keep_checkpoints)

    writer = write_shards if sharded else None
    every = config.checkpoint_every_epochs
    return Checkpointer(
        accelerator,
        run_dir,
        config.keep_checkpoints,
        config.checkpoint_every_steps,
        every_epochs=every or 1,
        per_run=None if every else CHECKPOINTS_PER_RUN,
        writer=writer,
    )


def masked_loss(accelerator: Accelerator) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """The engine's ``loss_fn``: the MAE loss of a batch ``(images, noise, labels)`` with its pre-drawn masks."""
    device = accelerator.device

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        imgs, noise, _ = batch
        return m(imgs.to(device, non_blocking=True), noise=noise.to(device, non_blocking=True)).loss

    return loss_fn


# Why compile=None means eager on a CPU (docs/benchmarks.md, "torch.compile on the CPU").
CPU_COMPILE_NOTE = (
    "measured 0.95-0.97x eager on an AVX2 EPYC, never paying back; 1.08-1.17x on an AVX-512 BF16 EPYC after 40-65 s "
    "of compiling, worth it only in runs of 15+ minutes"
)


def maybe_compile(
    config: PretrainConfig,
    model: torch.nn.Module,
    loader_for: Callable[[int, int], Iterable[Any]],
    state: TrainState,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    accelerator: Accelerator,
) -> torch.nn.Module:
    """``torch.compile`` (on by default with CUDA) after a trial step on the epoch's first batch, else ``model``.

    Off by default on CPUs: ``benchmarks/bench_compile.py`` measured inductor's step at 0.97x eager (tiny, 28 px) and
    0.95x (ViT-B/16) on an AVX2 EPYC in fp32, after 66-101 s of compiling, so it never pays back there; on an AVX-512
    BF16 EPYC 1.08-1.17x (ViT-T, fp32 and bf16), paying back after 5-15 minutes. CPUs differ, and a trial would cost the
    compile itself, so the default stays eager and ``compile=true`` is the switch for long runs on such machines.
    """
    if config.compile is None and accelerator.device.type != "cuda":
        accelerator.print(f"  torch.compile: off on the CPU ({CPU_COMPILE_NOTE}); compile=true turns it on")
        return model
    if config.compile is False:
        return model
    first = next(iter(loader_for(state.epoch, 0)))  # any full batch will do; an epoch's first always exists

    def trial(m: torch.nn.Module) -> torch.Tensor:
        with accelerator.autocast():  # the precision the steps will run in, so the graph is reused
            return loss_fn(m, first)

    return compile_model(model, trial, config.compile_backend, accelerator.print)


def epoch_end_hook(
    view: PlainCopy,
    pictures: ReconPictures,
    watch: MonitorRun,
    log: RunLog,
    accelerator: Accelerator,
    checkpointer: Checkpointer,
    schedule: Schedule,
) -> Callable[[TrainState], None]:
    """After a pass over an epoch: the reconstruction picture when a checkpoint is due, a monitor reading when due."""

    def on_epoch_end(state: TrainState) -> None:
        shown = view.sync()  # every process (a collective with fsdp), whatever the main process then does
        if accelerator.is_main_process:
            ended = state.batch_in_epoch == 0
            if not ended or checkpointer.due(state.epoch, schedule):  # a stopped run's picture shows where it stopped
                drawn = pictures.draw(shown, f"epoch_{state.epoch:03d}.png", accelerator.device)
                log_picture(accelerator, "pretrain/reconstruction", drawn, state.step)
            if ended and watch.due(state.epoch):
                watch.read(shown, accelerator, state.step, float(state.epoch), log, accelerator.print)
        accelerator.wait_for_everyone()

    return on_epoch_end


def report_session(run_dir: Path, watch: MonitorRun, elapsed: float, say: Callable[[str], None]) -> None:
    """What the monitor cost this session, and how many images failed to decode."""
    if watch.monitor is not None:
        say(
            f"  kNN monitor: {watch.seconds:.0f} s of this session's {elapsed:.0f} s "
            f"({100 * watch.seconds / max(elapsed, 1e-9):.1f}%)"
        )
    if broken := decode_skips(run_dir):
        say(
            f"  {len(broken)} images failed to decode while training (each replaced by the next readable one); "
            f"listed in {run_dir / SKIPPED_FILES}"
        )


def prepare_sharded(
    config: PretrainConfig, model: MaskedAutoencoder, accelerator: Accelerator, found: Checkpoint | None, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState, PlainCopy]:
    """FSDP: keep a plain copy on the main process, shard, build the optimizer, load a sharded checkpoint if any."""
    if found is not None and found.sharded is None:
        raise ConfigError(f"{found.path} is a whole-model checkpoint; fsdp=true resumes from its own sharded ones")
    plain = copy.deepcopy(model).to(accelerator.device) if accelerator.is_main_process else None
    model = shard_model(model, accelerator.device)
    local = sum(p.to_local().numel() for p in model.parameters())  # DTensor shards: this process's part
    accelerator.print(
        f"  fsdp: weights, gradients and AdamW state sharded over {accelerator.num_processes} "
        f"processes ({local:,} parameters on the main process)"
    )
    o = config.optim
    optimizer = pretrain_optimizer(model, lr, o.weight_decay, (o.betas[0], o.betas[1]), o.fused)
    state = TrainState()
    if found is not None:
        load_sharded(model, optimizer, found.sharded)  # type: ignore[arg-type]
        state = TrainState.from_dict(found.trainer_state)
    return model, accelerator.prepare(optimizer), state, PlainCopy(model, plain)


def export_weights(
    run_dir: Path,
    model: MaskedAutoencoder,
    config: PretrainConfig,
    data: PretrainData,
    state: TrainState,
    pictures: ReconPictures,
    say: Callable[[str], None],
    device: torch.device,
) -> None:
    """The finished run's encoder and whole MAE as safetensors with their metadata, and the final picture."""
    facts = {
        "variant": config.model.name,
        "mean": list(data.mean),
        "std": list(data.std),
        "source": config.data.source,
        "norm_pix_loss": model.norm_pix_loss,
        "epochs": config.optim.epochs,
        "steps": state.step,
        "val_size": config.data.val_size,  # the validation images it was never trained on (mpp.data.holdout)
        "val_seed": config.data.val_seed,
    }
    save_encoder(model, run_dir / "encoder.safetensors", **facts)
    save_mae(model, run_dir / "mae.safetensors", **facts)  # whole model: reconstructions, more pretraining
    final = pictures.draw(model, "final.png", device)
    say(f"done: {state.step} steps. encoder: {run_dir / 'encoder.safetensors'}; reconstructions: {final}")


def build_monitor(config: PretrainConfig, eval_set: Any) -> KnnMonitor | None:
    """The kNN monitor on a seeded subset of the training split (``eval_set``), or None (disabled / no labels)."""
    m = config.monitor
    if not m.enabled:
        return None
    monitor = KnnMonitor.from_dataset(
        eval_set, m.samples, m.query_fraction, config.seed, k=m.k, temperature=m.temperature, batch_size=m.batch_size
    )
    if monitor is None:
        print(f"mpp pretrain: note: kNN monitor off, {config.data.source} split {config.data.split!r} has no labels")
    return monitor


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp pretrain``."""
    return command_main("mpp pretrain", PretrainConfig, "MAE pretraining.", run, argv, takes_init=False)
