"""``mpp pretrain``: MAE pretraining on a dataset or image folder, from one CPU to many GPUs, exactly resumable.

Usage::

    mpp pretrain --recipe recipes/fmnist_tiny.yaml optim.epochs=20 output_dir=runs/fm
    mpp pretrain --resume runs/fm                       # continue a stopped run (also automatic)
    accelerate launch --multi_gpu --num_processes 8 -m mpp pretrain --recipe recipes/mae_vit_base_1600ep.yaml
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import Subset

from mpp.checkpoint import Checkpoint
from mpp.commands import run_command
from mpp.config import ConfigError, PretrainConfig, build_config, model_overrides, to_dict
from mpp.data import build_dataset, default_stats
from mpp.data.memory import MemoryPretrainSamples, decode_all, memory_epoch_batches
from mpp.data.skips import SKIPPED_FILES, decode_skips, start_skip_log
from mpp.data.stream import StreamHead, StreamPretrainSamples, open_stream, stream_length
from mpp.data.transforms import eval_transform, pretrain_transform
from mpp.engine import (
    Checkpointer,
    FitHooks,
    NonFiniteLossError,
    RunLog,
    Schedule,
    TrainState,
    check_resumable,
    fit,
    plan_schedule,
    restore,
    restore_scaler,
    resume_state,
)
from mpp.fsdp import PlainCopy, load_sharded, save_sharded, shard_model
from mpp.masking import num_kept
from mpp.models import MaskedAutoencoder, create_model
from mpp.monitor import KnnMonitor, MonitorRun, previous_random_reading
from mpp.optim import pretrain_optimizer
from mpp.runinfo import settings_to_resume, write_config
from mpp.runtime import check_output_dir, compile_model, make_accelerator, seed_everything
from mpp.sampling import EpochLoader, SeededPretrainSamples
from mpp.viz import save_reconstruction_grid
from mpp.weights import save_encoder, save_mae

# Settings that may differ between a run and its resumption without changing the result.
# The monitor only reads the model (eval mode, no RNG), so its settings are free too.
# Where the run lives (output_dir) is not a setting: a moved, copied or differently spelled run dir resumes.
RESUME_FREE_KEYS = {
    "output_dir", "stop_at_step", "progress", "log_every", "keep_checkpoints", "checkpoint_every_steps", "monitor",
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="mpp pretrain",
        description="MAE pretraining. Settings: defaults <- --recipe YAML <- key=value overrides (dotted keys).",
    )
    parser.add_argument("--recipe", help="YAML recipe stating what differs from the defaults")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.blr=1.5e-4 model.mask_ratio=0.75")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --recipe


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """The run's config: a saved run's (``--resume``) or defaults + recipe, then overrides."""
    if args.resume:
        base = settings_to_resume(args.resume, args.recipe)
        return build_config(PretrainConfig, None, args.overrides, base=base)
    return build_config(PretrainConfig, args.recipe, args.overrides)


def build_mae(config: PretrainConfig) -> MaskedAutoencoder:
    """The MAE described by ``config.model``."""
    return create_model(config.model.name, **model_overrides(config.model))


def data_stats(config: PretrainConfig, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: the config's, else the source's defaults."""
    if config.data.mean is not None and config.data.std is not None:
        mean, std = tuple(config.data.mean), tuple(config.data.std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ConfigError(
                f"data.mean/data.std have {len(mean)}/{len(std)} values but the model has {in_chans} channels"
            )
        return mean, std
    return default_stats(config.data.source, in_chans)


# Sources whose images are arrays in memory already: decoding them up front costs seconds and no disk.
IN_MEMORY_SOURCES = ("fashion-mnist", "synthetic")


def make_dataset(config: PretrainConfig, transform: Any, in_chans: int, img_size: int) -> Any:
    """The training split of the configured source with ``transform`` (a seeded subset if ``data.limit``)."""
    d = config.data
    dataset = build_dataset(
        d.source, d.split, transform, path=d.path, in_chans=in_chans, image_column=d.image_column,
        label_column=d.label_column, cache_dir=d.cache_dir, synthetic_size=d.synthetic_size,
        synthetic_img_size=img_size, synthetic_classes=d.synthetic_classes, seed=config.seed,
    )  # fmt: skip
    if d.limit is not None and d.limit < len(dataset):
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[: d.limit]
        dataset = Subset(dataset, sorted(keep.tolist()))
    return dataset


@dataclass
class PretrainData:
    """The masked training samples, the same images untransformed for pictures and the monitor, their statistics."""

    samples: SeededPretrainSamples | MemoryPretrainSamples | StreamPretrainSamples
    plain: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_memory(self) -> bool:
        """Whether batches are augmented in the training process from decoded images (:mod:`mpp.data.memory`)."""
        return isinstance(self.samples, MemoryPretrainSamples)


def build_data(config: PretrainConfig, model: MaskedAutoencoder) -> PretrainData:
    """Augmented, pre-masked training samples and the plain (evaluation-transform) view of the same split."""
    img_size, in_chans = model.img_size[0], model.in_chans
    mean, std = data_stats(config, in_chans)
    scale = (config.data.crop_scale_min, 1.0)
    if config.data.streaming:
        return stream_data(config, model, mean, std)
    in_memory = config.data.in_memory
    if in_memory is None:
        in_memory = config.data.source in IN_MEMORY_SOURCES
    if in_memory:
        source = make_dataset(config, None, in_chans, img_size)
        images, labels = decode_all(source, model.img_size)
        samples: Any = MemoryPretrainSamples(images, labels, model.grid_size, model.mask_ratio, model.mask_type,
                                             config.seed, scale, config.data.hflip, mean, std, base=source)  # fmt: skip
    else:
        train_tf = pretrain_transform(model.img_size, mean, std, scale=scale, hflip=config.data.hflip)
        samples = SeededPretrainSamples(make_dataset(config, train_tf, in_chans, img_size), model.grid_size,
                                        model.mask_ratio, model.mask_type, config.seed)  # fmt: skip
    plain = make_dataset(config, eval_transform(model.img_size, mean, std), in_chans, img_size)
    return PretrainData(samples, plain, mean, std)


def stream_data(
    config: PretrainConfig, model: MaskedAutoencoder, mean: tuple[float, ...], std: tuple[float, ...]
) -> PretrainData:
    """A streamed hf split (:mod:`mpp.data.stream`); the first images of the stream for the monitor and pictures."""
    d = config.data
    assert d.path is not None  # checked with the config
    stream, known = open_stream(d.path, d.split, d.image_column, d.cache_dir)
    length = stream_length(stream, known, d.split, d.stream_length, d.path)
    scale = (d.crop_scale_min, 1.0)
    train_tf = pretrain_transform(model.img_size, mean, std, scale=scale, hflip=d.hflip)
    samples = StreamPretrainSamples(stream, length, train_tf, model.in_chans, d.image_column, d.label_column,
                                    model.grid_size, model.mask_ratio, model.mask_type, config.seed, d.shuffle_buffer,
                                    d.stream_threads)  # fmt: skip
    head = max(config.monitor.samples if config.monitor.enabled else 0, config.viz_samples, 1)
    plain = StreamHead(stream, head, eval_transform(model.img_size, mean, std), model.in_chans, d.image_column,
                       d.label_column, name=f"hf {d.path}:{d.split}")  # fmt: skip
    return PretrainData(samples, plain, mean, std)


def announce(
    say: Callable[[str], None], config: PretrainConfig, model: MaskedAutoencoder, data: PretrainData,
    accelerator: Accelerator, schedule: Schedule,
) -> dict[str, Any]:  # fmt: skip
    """Print what the run will do; the derived numbers recorded in config.yaml."""
    visible = num_kept(model.num_patches, model.mask_ratio) + model.num_prefix_tokens
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"mpp pretrain: {config.model.name} ({params / 1e6:.2f}M trainable) on {config.data.source} "
        f"({len(data.samples)} images), {schedule.world} process(es) on {accelerator.device}, "
        f"precision {accelerator.mixed_precision}")  # fmt: skip
    say(schedule.describe("optim"))
    say(f"  encoder sees {visible} of {model.num_patches + model.num_prefix_tokens} tokens per image, "
        f"{visible * schedule.effective_batch} per step")  # fmt: skip
    say("  data: decoded once into memory, batches augmented in the training process" if data.in_memory
        else f"  data: {config.data.num_workers} loader worker(s) decoding and augmenting each image")  # fmt: skip
    return {
        "world_size": schedule.world, "effective_batch": schedule.effective_batch, "lr": schedule.lr,
        "dataset_size": len(data.samples), "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps, "encoder_tokens_per_step": visible * schedule.effective_batch,
        "mean": list(data.mean), "std": list(data.std), "params": params, "in_memory": data.in_memory,
    }  # fmt: skip


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
        return save_reconstruction_grid(self.run_dir / "recon" / name, model, self.imgs.to(device), self.mean,
                                        self.std, noise=self.noise.to(device))  # fmt: skip


def run(config: PretrainConfig) -> Path:
    """Pretrain; returns the run directory. Raises ``NonFiniteLossError`` if the loss diverges."""
    run_dir = check_output_dir(Path(config.output_dir))
    found = resume_state(run_dir)
    if found is not None:
        check_resumable(run_dir, config, RESUME_FREE_KEYS, "mpp pretrain --resume")

    seed_everything(config.seed)  # before the model, so its initial weights are the seed's
    model = build_mae(config)
    data = build_data(config, model)
    accelerator = make_accelerator(config.mixed_precision, config.cpu, log_with="tensorboard",
                                   project_dir=str(run_dir))  # fmt: skip
    say = accelerator.print
    schedule = plan_schedule(config.optim, len(data.samples), accelerator.num_processes, "optim")
    derived = announce(say, config, model, data, accelerator, schedule)
    if accelerator.is_main_process:
        write_config(run_dir / "config.yaml", to_dict(config), **derived)
    skipped = start_skip_log(data.samples, run_dir, write=accelerator.is_main_process)
    if skipped:
        say(skipped)
    accelerator.wait_for_everyone()

    o = config.optim
    sharded = config.fsdp and accelerator.num_processes > 1
    if config.fsdp and not sharded:
        say("  fsdp: one process, nothing to shard; the model is trained whole")
    if found is not None and found.sharded is not None and not sharded:
        raise ConfigError(f"{found.path} is a sharded (fsdp=true) checkpoint; resume it with fsdp=true on >1 process")
    if sharded:
        model, optimizer, state, view = prepare_sharded(config, model, accelerator, found, schedule.lr)
    else:
        optimizer = pretrain_optimizer(model, schedule.lr, o.weight_decay, (o.betas[0], o.betas[1]), o.fused)
        state = restore(found, model, optimizer) if found is not None else TrainState()
        model, optimizer = accelerator.prepare(model, optimizer)
        view = PlainCopy(None, accelerator.unwrap_model(model))
    if found is not None:
        say(f"  resumed from {found.path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    restore_scaler(found, accelerator)
    train_model = model
    raw: MaskedAutoencoder = accelerator.unwrap_model(model)  # sharded: its attributes only, no forward on one rank

    main = accelerator.is_main_process
    if main:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(to_dict(config)))
    log = RunLog(accelerator, run_dir, "pretrain")
    pictures = ReconPictures.of(run_dir, data, raw, config.viz_samples, config.seed)
    watch = MonitorRun(
        build_monitor(config, data.plain) if main else None, config.monitor.every_epochs, o.epochs,
        raw.global_pool if raw.cls_token is not None else "avg",
        previous_random_reading(run_dir / "metrics.jsonl") if found is not None else None,
    )  # fmt: skip

    def on_epoch_end(state: TrainState) -> None:
        shown = view.sync()
        if main:
            pictures.draw(shown, f"epoch_{state.epoch:03d}.png", accelerator.device)
            if state.batch_in_epoch == 0 and watch.due(state.epoch):
                watch.read(shown, accelerator, state.step, float(state.epoch), log, say)
        accelerator.wait_for_everyone()

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        imgs, noise, _ = batch
        device = accelerator.device
        return m(imgs.to(device, non_blocking=True), noise=noise.to(device, non_blocking=True)).loss

    loader_for: Callable[[int, int], Iterable[Any]]
    if isinstance(data.samples, StreamPretrainSamples):
        stream = data.samples

        def loader_for(epoch: int, skip: int) -> Iterable[Any]:
            return stream.epoch_batches(schedule.batch_size, epoch, rank=accelerator.process_index,
                                        world_size=schedule.world, skip_batches=skip)  # fmt: skip
    elif data.in_memory:

        def loader_for(epoch: int, skip: int) -> Iterable[Any]:
            return memory_epoch_batches(data.samples, schedule.batch_size, epoch, rank=accelerator.process_index,
                                        world_size=schedule.world, seed=config.seed, skip_batches=skip)  # fmt: skip
    else:
        loader_for = EpochLoader(data.samples, schedule.batch_size, rank=accelerator.process_index,
                                 world_size=schedule.world, seed=config.seed, num_workers=config.data.num_workers,
                                 pin_memory=accelerator.device.type == "cuda",
                                 persistent_workers=config.data.persistent_workers,
                                 prefetch_factor=config.data.prefetch_factor)  # fmt: skip

    if config.compile or (config.compile is None and accelerator.device.type == "cuda"):
        first = next(iter(loader_for(state.epoch, 0)))  # any full batch will do; an epoch's first always exists

        def trial(m: torch.nn.Module) -> torch.Tensor:
            with accelerator.autocast():  # the precision the steps will run in, so the graph is reused
                return loss_fn(m, first)

        train_model = compile_model(model, trial, config.compile_backend, say)

    start = time.perf_counter()
    if state.step == 0:
        shown = view.sync()
        if main:
            watch.read(shown, accelerator, 0, 0.0, log, say)  # random init: what every later reading is compared with
    accelerator.wait_for_everyone()

    def write_shards(m: torch.nn.Module, opt: torch.optim.Optimizer, trainer: dict[str, Any]) -> Path | None:
        return save_sharded(accelerator, run_dir, m, opt, trainer, config.keep_checkpoints)

    checkpointer = Checkpointer(accelerator, run_dir, config.keep_checkpoints, config.checkpoint_every_steps,
                                writer=write_shards if sharded else None)  # fmt: skip
    try:
        finished = fit(accelerator, train_model, optimizer, loss_fn, schedule, state, loader_for, seed=config.seed,
                       log=log, log_every=config.log_every, clip_grad=o.clip_grad, checkpointer=checkpointer,
                       hooks=FitHooks(on_epoch_end=on_epoch_end), stop_at_step=config.stop_at_step,
                       progress=config.progress, bar_extra=watch.bar_extra, say=say)  # fmt: skip
    except NonFiniteLossError:
        accelerator.end_training()
        raise
    finally:
        log.close()
    if watch.monitor is not None:
        elapsed = time.perf_counter() - start
        say(f"  kNN monitor: {watch.seconds:.0f} s of this session's {elapsed:.0f} s "
            f"({100 * watch.seconds / max(elapsed, 1e-9):.1f}%)")  # fmt: skip
    if broken := decode_skips(run_dir):
        say(f"  {len(broken)} images failed to decode while training (each replaced by the next readable one); "
            f"listed in {run_dir / SKIPPED_FILES}")  # fmt: skip
    if finished:
        shown = view.sync()
        if main:
            export_weights(run_dir, shown, config, data, state, pictures, say, accelerator.device)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def prepare_sharded(
    config: PretrainConfig, model: MaskedAutoencoder, accelerator: Accelerator, found: Checkpoint | None, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState, PlainCopy]:
    """FSDP: keep a plain copy on the main process, shard, build the optimizer, load a sharded checkpoint if any."""
    if found is not None and found.sharded is None:
        raise ConfigError(f"{found.path} is a whole-model checkpoint; fsdp=true resumes from its own sharded ones")
    plain = copy.deepcopy(model).to(accelerator.device) if accelerator.is_main_process else None
    model = shard_model(model, accelerator.device)
    local = sum(p.to_local().numel() for p in model.parameters())  # DTensor shards: this process's part
    accelerator.print(f"  fsdp: weights, gradients and AdamW state sharded over {accelerator.num_processes} "
                      f"processes ({local:,} parameters on the main process)")  # fmt: skip
    o = config.optim
    optimizer = pretrain_optimizer(model, lr, o.weight_decay, (o.betas[0], o.betas[1]), o.fused)
    state = TrainState()
    if found is not None:
        load_sharded(model, optimizer, found.sharded)  # type: ignore[arg-type]
        state = TrainState.from_dict(found.trainer_state)
    return model, accelerator.prepare(optimizer), state, PlainCopy(model, plain)


def export_weights(
    run_dir: Path, model: MaskedAutoencoder, config: PretrainConfig, data: PretrainData, state: TrainState,
    pictures: ReconPictures, say: Callable[[str], None], device: torch.device,
) -> None:  # fmt: skip
    """The finished run's encoder and whole MAE as safetensors with their metadata, and the final picture."""
    facts = {"variant": config.model.name, "mean": list(data.mean), "std": list(data.std),
             "source": config.data.source, "norm_pix_loss": model.norm_pix_loss, "epochs": config.optim.epochs,
             "steps": state.step}  # fmt: skip
    save_encoder(model, run_dir / "encoder.safetensors", **facts)
    save_mae(model, run_dir / "mae.safetensors", **facts)  # whole model: reconstructions, more pretraining
    final = pictures.draw(model, "final.png", device)
    say(f"done: {state.step} steps. encoder: {run_dir / 'encoder.safetensors'}; reconstructions: {final}")


def build_monitor(config: PretrainConfig, eval_set: Any) -> KnnMonitor | None:
    """The kNN monitor on a seeded subset of the training split (``eval_set``), or None (disabled / no labels)."""
    m = config.monitor
    if not m.enabled:
        return None
    monitor = KnnMonitor.from_dataset(eval_set, m.samples, m.query_fraction, config.seed, k=m.k,
                                      temperature=m.temperature, batch_size=m.batch_size)  # fmt: skip
    if monitor is None:
        print(f"mpp pretrain: note: kNN monitor off, {config.data.source} split {config.data.split!r} has no labels")
    return monitor


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take scalars only: flatten sections and stringify lists and None."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp pretrain``."""
    args = parse_args(argv)
    return run_command("mpp pretrain", lambda: resolve_config(args), run, args.print_config)
