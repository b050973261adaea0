"""``mpp pretrain``: MAE pretraining on a dataset or image folder, from one CPU to many GPUs, exactly resumable.

Usage::

    mpp pretrain --recipe recipes/fmnist_tiny.yaml optim.epochs=20 output_dir=runs/fm
    mpp pretrain --resume runs/fm                       # continue a stopped run (also automatic)
    accelerate launch --multi_gpu --num_processes 8 -m mpp pretrain --recipe recipes/mae_vit_base_1600ep.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import Subset
from tqdm import tqdm

from mpp.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mpp.config import ConfigError, PretrainConfig, build_config, from_dict, model_overrides, to_dict, validate
from mpp.data import build_dataset, default_stats
from mpp.data.transforms import eval_transform, pretrain_transform
from mpp.engine import NonFiniteLossError, StepInfo, Throughput, TrainState, train_one_epoch
from mpp.masking import num_kept
from mpp.models import MaskedAutoencoder, create_model
from mpp.monitor import KnnMonitor, MonitorReading
from mpp.optim import absolute_lr, effective_batch, lr_at, pretrain_optimizer
from mpp.runinfo import read_config, write_config
from mpp.sampling import SeededPretrainSamples, batches_per_epoch, epoch_loader
from mpp.viz import save_reconstruction_grid
from mpp.weights import save_encoder, save_mae

# Settings that may differ between a run and its resumption without changing the result.
# The monitor only reads the model (eval mode, no RNG), so its settings are free too.
RESUME_FREE_KEYS = {"stop_at_step", "progress", "log_every", "keep_checkpoints", "checkpoint_every_steps", "monitor"}


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
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there (not an mpp pretraining run)")
        if args.recipe:
            raise ConfigError("--resume takes the run's saved config; do not pass --recipe with it")
        from mpp.config import merge, parse_override

        data = read_config(saved)
        for item in args.overrides:
            merge(data, *parse_override(item))
        data["output_dir"] = str(args.resume)
        config = from_dict(PretrainConfig, data)
        validate(config)
        return config
    return build_config(PretrainConfig, args.recipe, args.overrides)


def build_model(config: PretrainConfig) -> MaskedAutoencoder:
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


def resolve_precision(requested: str, cpu: bool) -> str:
    """``auto`` means bf16 on a CUDA GPU and fp32 elsewhere.

    On CPUs without AMX / AVX512-BF16 (e.g. AMD EPYC with AVX2 only) bf16 matmuls fall back to slow kernels:
    measured here a tiny-MAE step took 12 s in bf16 against 0.5 s in fp32.
    """
    if requested != "auto":
        return "no" if requested == "fp32" else requested
    return "bf16" if torch.cuda.is_available() and not cpu and torch.cuda.is_bf16_supported() else "no"


def use_cpu(requested: bool) -> bool:
    """Run on the CPU if asked, or when launched as several processes on a machine without CUDA.

    Accelerate only sets up a gloo process group for ``accelerate launch --multi_gpu`` without GPUs when told the
    run is on the CPU; otherwise each process would silently train alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return requested or (launched and not torch.cuda.is_available())


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


def check_resumable(run_dir: Path, config: PretrainConfig) -> None:
    """Refuse to silently continue a run whose saved config differs in anything that changes the result."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved, wanted = read_config(saved_path), to_dict(config)
    diffs = [k for k in sorted(set(saved) | set(wanted)) if k not in RESUME_FREE_KEYS and saved.get(k) != wanted.get(k)]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpointed run with different settings ({', '.join(diffs)}); "
            f"use `mpp pretrain --resume {run_dir}` to continue it, or choose another output_dir"
        )


def run(config: PretrainConfig) -> Path:
    """Pretrain; returns the run directory. Raises ``NonFiniteLossError`` if the loss diverges."""
    run_dir = Path(config.output_dir)
    resume_from = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume_from is not None:
        check_resumable(run_dir, config)

    set_seed(config.seed)  # before the model, so its initial weights are the seed's
    model = build_model(config)
    img_size, in_chans = model.img_size[0], model.in_chans
    mean, std = data_stats(config, in_chans)
    o = config.optim
    train_tf = pretrain_transform(
        model.img_size, mean, std, scale=(config.data.crop_scale_min, 1.0), hflip=config.data.hflip
    )
    dataset = SeededPretrainSamples(
        make_dataset(config, train_tf, in_chans, img_size),
        model.grid_size,
        model.mask_ratio,
        model.mask_type,
        config.seed,
    )
    viz_set = make_dataset(config, eval_transform(model.img_size, mean, std), in_chans, img_size)

    precision = resolve_precision(config.mixed_precision, config.cpu)
    accelerator = Accelerator(
        mixed_precision=precision, cpu=use_cpu(config.cpu), log_with="tensorboard", project_dir=str(run_dir)
    )
    world = accelerator.num_processes
    # One process measures; the others would only hold a second copy of the cached subset.
    monitor = build_monitor(config, viz_set) if accelerator.is_main_process else None
    eff_batch = effective_batch(o.batch_size, o.accum_steps, world)
    lr = o.lr if o.lr is not None else absolute_lr(o.blr, eff_batch)
    micro_per_epoch = batches_per_epoch(len(dataset), o.batch_size, world)
    steps_per_epoch = micro_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"optim.batch_size={o.batch_size}: {len(dataset)} images give no full step of {eff_batch} images "
            f"({world} processes x {o.accum_steps} accumulation); lower the batch size"
        )
    total_steps = steps_per_epoch * o.epochs
    visible = num_kept(model.num_patches, model.mask_ratio) + model.num_prefix_tokens
    derived = {
        "world_size": world, "effective_batch": eff_batch, "lr": lr, "dataset_size": len(dataset),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "encoder_tokens_per_step": visible * eff_batch, "mean": list(mean), "std": list(std),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }  # fmt: skip
    say = accelerator.print
    say(
        f"mpp pretrain: {config.model.name} ({derived['params'] / 1e6:.2f}M trainable) on {config.data.source} "
        f"({len(dataset)} images), {world} process(es) on {accelerator.device}, precision {precision}"
    )
    say(
        f"  effective batch {eff_batch} = {o.batch_size} x {o.accum_steps} accum x {world} procs; "
        f"lr {lr:.3g} = blr {o.blr:g} x {eff_batch} / 256" + (" (optim.lr set directly)" if o.lr is not None else "")
    )
    say(
        f"  {steps_per_epoch} steps/epoch x {o.epochs} epochs = {total_steps} steps; encoder sees {visible} of "
        f"{model.num_patches + model.num_prefix_tokens} tokens per image, {visible * eff_batch} per step"
    )

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir / "config.yaml", to_dict(config), **derived)
    accelerator.wait_for_everyone()

    optimizer = pretrain_optimizer(model, lr, o.weight_decay, (o.betas[0], o.betas[1]))
    state = TrainState()
    if resume_from is not None:
        model_state, optim_state, trainer = load_checkpoint(resume_from)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state["optimizer"])
        state = TrainState(**trainer)
        say(f"  resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None and "scaler" in optim_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(optim_state["scaler"])
    train_model = torch.compile(model) if config.compile else model
    raw_model: MaskedAutoencoder = accelerator.unwrap_model(model)

    if accelerator.is_main_process:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(to_dict(config)))
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None  # noqa: SIM115
    viz_imgs = torch.stack([viz_set[i][0] for i in range(min(config.viz_samples, len(viz_set)))])
    viz_noise = torch.rand(
        viz_imgs.shape[0], raw_model.num_patches, generator=torch.Generator().manual_seed(config.seed)
    )

    def save(tag: str) -> None:
        if accelerator.is_main_process:
            opt_state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
            if accelerator.scaler is not None:
                opt_state["scaler"] = accelerator.scaler.state_dict()
            path = save_checkpoint(run_dir, state.step, raw_model.state_dict(), opt_state, state.to_dict(),
                                   keep=config.keep_checkpoints)  # fmt: skip
            if tag:
                say(f"  checkpoint ({tag}): {path}")
        accelerator.wait_for_everyone()

    def draw(name: str) -> Path | None:
        if not accelerator.is_main_process:
            return None
        device = accelerator.device
        return save_reconstruction_grid(run_dir / "recon" / name, raw_model, viz_imgs.to(device), mean, std,
                                        noise=viz_noise.to(device))  # fmt: skip

    run_start = time.perf_counter()
    monitor_seconds = 0.0
    random_top1 = previous_random_reading(run_dir / "metrics.jsonl") if resume_from is not None else None
    pool = raw_model.global_pool if raw_model.cls_token is not None else "avg"

    def watch(epoch: float) -> None:
        """A monitor reading, logged everywhere; the first one of a fresh run is the random-init reference."""
        nonlocal monitor_seconds, random_top1
        if monitor is not None and accelerator.is_main_process:
            reading = monitor.measure(raw_model, accelerator.device, accelerator.autocast)
            monitor_seconds += reading.seconds
            if random_top1 is None:
                random_top1 = dict(reading.top1)
            record = monitor_record(state.step, epoch, reading, random_top1)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            accelerator.log({f"monitor/{k}": v for k, v in record.items() if k.startswith("knn_")}, step=state.step)
            bar_extra.update(knn=f"{reading.top1[pool]:.1f}", knn_rand=f"{random_top1.get(pool, float('nan')):.1f}")
            say(f"  kNN monitor at epoch {epoch:g}: {monitor_text(reading, random_top1)} [{reading.seconds:.1f} s]")
        accelerator.wait_for_everyone()

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        imgs, noise, _ = batch
        device = accelerator.device
        return m(imgs.to(device, non_blocking=True), noise=noise.to(device, non_blocking=True)).loss

    show_bar = config.progress and accelerator.is_local_main_process
    bar = tqdm(total=total_steps, initial=state.step, disable=not show_bar, unit="step", dynamic_ncols=True)
    meter = Throughput()
    window: list[float] = []
    bar_extra: dict[str, str] = {}
    stop_at = config.stop_at_step

    def on_step(info: StepInfo) -> bool:
        meter.update(info.images)
        window.append(info.loss)
        bar.update(1)
        if info.step % config.log_every == 0 or info.step == total_steps:
            record = {"step": info.step, "epoch": round(info.epoch_float, 4), "loss": sum(window) / len(window),
                      "lr": info.lr, "images_per_s": round(meter.rate(), 2), "stage": "pretrain"}  # fmt: skip
            window.clear()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{info.lr:.2e}", img_s=f"{record['images_per_s']:.0f}",
                            **bar_extra)  # fmt: skip
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            accelerator.log({"train/loss": record["loss"], "train/lr": info.lr,
                             "train/images_per_s": record["images_per_s"]}, step=info.step)  # fmt: skip
        if config.checkpoint_every_steps and info.step % config.checkpoint_every_steps == 0:
            save("")
        return stop_at is not None and info.step >= stop_at

    def lr_fn(epoch: float) -> float:
        return lr_at(epoch, lr, o.min_lr, o.warmup_epochs, o.epochs)

    stopped = False
    if state.step == 0:
        watch(0.0)  # random init: the reference every later reading is compared with
    try:
        while state.epoch < o.epochs and not stopped:
            if stop_at is not None and state.step >= stop_at:
                break
            loader = epoch_loader(
                dataset, o.batch_size, state.epoch, rank=accelerator.process_index, world_size=world,
                seed=config.seed, skip_batches=state.batch_in_epoch, num_workers=config.data.num_workers,
                pin_memory=accelerator.device.type == "cuda",
            )  # fmt: skip
            usable = steps_per_epoch * o.accum_steps - state.batch_in_epoch  # drop a trailing partial accumulation
            batches = (b for i, b in enumerate(loader) if i < usable)
            stopped = train_one_epoch(
                accelerator, train_model, optimizer, batches, loss_fn, state, lr_fn=lr_fn,
                steps_per_epoch=steps_per_epoch, accum_steps=o.accum_steps, clip_grad=o.clip_grad, seed=config.seed,
                on_step=on_step,
            )  # fmt: skip
            if not stopped or state.batch_in_epoch >= steps_per_epoch * o.accum_steps:
                state.epoch += 1
                state.batch_in_epoch = 0
            draw(f"epoch_{state.epoch:03d}.png")
            epoch_done = state.batch_in_epoch == 0
            if epoch_done and (state.epoch % config.monitor.every_epochs == 0 or state.epoch == o.epochs):
                watch(float(state.epoch))
            save(f"epoch {state.epoch}" if not stopped else f"stopped at step {state.step}")
    except NonFiniteLossError:
        bar.close()
        accelerator.end_training()
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
    bar.close()
    if monitor is not None:
        elapsed = time.perf_counter() - run_start
        say(f"  kNN monitor: {monitor_seconds:.0f} s of this session's {elapsed:.0f} s "
            f"({100 * monitor_seconds / max(elapsed, 1e-9):.1f}%)")  # fmt: skip

    if state.epoch >= o.epochs and accelerator.is_main_process:
        facts = {"variant": config.model.name, "mean": list(mean), "std": list(std), "source": config.data.source,
                 "norm_pix_loss": raw_model.norm_pix_loss, "epochs": o.epochs, "steps": state.step}  # fmt: skip
        save_encoder(raw_model, run_dir / "encoder.safetensors", **facts)
        save_mae(raw_model, run_dir / "mae.safetensors", **facts)  # whole model: reconstructions, more pretraining
        final = draw("final.png")
        say(f"done: {state.step} steps. encoder: {run_dir / 'encoder.safetensors'}; reconstructions: {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


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


def monitor_record(step: int, epoch: float, reading: MonitorReading, random_top1: dict[str, float]) -> dict[str, Any]:
    """The metrics.jsonl record of a monitor reading: ``knn_<pool>`` and ``knn_<pool>_random`` (top-1 %)."""
    record: dict[str, Any] = {"step": step, "epoch": round(epoch, 4), "stage": "monitor"}
    for pool, top1 in reading.top1.items():
        record[f"knn_{pool}"] = round(top1, 2)
        if pool in random_top1:
            record[f"knn_{pool}_random"] = round(random_top1[pool], 2)
    record["monitor_s"] = round(reading.seconds, 2)
    return record


def monitor_text(reading: MonitorReading, random_top1: dict[str, float]) -> str:
    """``token 74.1% (random 66.6%), avg 75.3% (random 61.6%)``."""
    return ", ".join(f"{pool} {top1:.2f}% (random {random_top1.get(pool, float('nan')):.2f}%)"
                     for pool, top1 in reading.top1.items())  # fmt: skip


def previous_random_reading(metrics_path: Path) -> dict[str, float] | None:
    """The random-init monitor reading a resumed run logged at its start, if any."""
    if not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("stage") == "monitor" and record.get("step") == 0:
            return {k[4:]: v for k, v in record.items() if k.startswith("knn_") and not k.endswith("_random")}
    return None


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
    try:
        config = resolve_config(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(config), sort_keys=False))
            return 0
        run(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"mpp pretrain: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"mpp pretrain: stopped: {err}", file=sys.stderr)
        return 3
    return 0
