"""``mpp finetune``: end-to-end fine-tuning with the MAE paper's recipe, or the same recipe from random init.

The model is a :class:`~mpp.models.classifier.ViTClassifier` (average pooling + fresh ``fc_norm`` by default, the
encoder's final norm dropped; head trunc-normal std 2e-5). Training: AdamW (0.9, 0.999), ``lr = blr * eff_batch /
256``, layer-wise lr decay with the official layer ids (``lr_scale = decay ** (depth + 1 - layer_id)``), no weight
decay on 1-D tensors, ``cls_token`` and ``pos_embed``, warmup + cosine to ``min_lr``, drop path, timm's
RandAugment, random erasing, Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), optional EMA (timm
ModelEmaV3). The position table becomes learnable, initialised from the pretrained one, and a new ``img_size`` or
``patch_size`` resizes it by 2D bicubic interpolation (:func:`mpp.pos_embed.resize_pos_embed`).

Usage::

    mpp finetune runs/fmnist_tiny --recipe recipes/finetune_fmnist.yaml
    mpp finetune init=random model=mae_vit_tiny_patch4 --recipe recipes/finetune_fmnist.yaml   # from scratch
    accelerate launch --multi_gpu --num_processes 8 -m mpp finetune mae_pretrain_vit_base.pth --recipe R.yaml
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

import mpp
from mpp.data.augment import finetune_transform
from mpp.engine import StepInfo, Throughput, TrainState, train_one_epoch
from mpp.eval_config import FinetuneConfig
from mpp.metrics import classification_metrics
from mpp.models.classifier import FINETUNE_HEAD_STD, ViTClassifier
from mpp.models.vit import ViTEncoder
from mpp.optim import absolute_lr, effective_batch, layer_decay_param_groups, lr_at
from mpp.report import write_results
from mpp.sampling import batches_per_epoch, epoch_loader
from mpp.stage import (
    SeededItems,
    Splits,
    batched,
    budget_text,
    build_splits,
    encoder_description,
    eval_tf,
    loader_workers,
    make_accelerator,
    resolve_stats,
    results_header,
    run_dir_of,
    save_run_config,
    stage_encoder,
    stage_main,
    stretch_schedule,
)

CLASSIFIER_FORMAT = "mpp.classifier.v1"


def make_trainable_grid(encoder: ViTEncoder, img_size: int | None, patch_size: int | None) -> None:
    """Make the position table learnable (initialised from the current one) and resize it to a new grid if asked.

    The resize is the 2D bicubic interpolation of :func:`mpp.pos_embed.resize_pos_embed` (the cls row kept), not a
    recomputed sin-cos table: the pretrained table is the starting point, as in the official fine-tuning.
    """
    encoder.pos_embed_type = "learned"
    encoder.encoder_config["pos_embed"] = "learned"
    encoder.pos_embed.requires_grad_(True)
    size = img_size or encoder.img_size[0]
    patch = patch_size or encoder.patch_size
    if (size, size) != tuple(encoder.img_size) or patch != encoder.patch_size:
        encoder.set_grid(size, patch)


def loss_for(mixup: Mixup | None, smoothing: float) -> nn.Module:
    """Soft-target CE under mixup/cutmix (labels already smoothed by timm's Mixup), else (smoothed) CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


def save_classifier(path: Path, model: ViTClassifier, **extra: Any) -> Path:
    """The fine-tuned classifier as safetensors, with what rebuilds and feeds it in the header (like encoders)."""
    meta = {"format": CLASSIFIER_FORMAT, "mpp_version": mpp.__version__, "encoder": model.encoder.encoder_config,
            "num_classes": model.num_classes, "global_pool": model.global_pool, **extra}  # fmt: skip
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    return path


def load_classifier(path: str | Path) -> tuple[ViTClassifier, dict[str, Any]]:
    """Rebuild a fine-tuned classifier written by :func:`save_classifier`: ``(model in eval mode, metadata)``."""
    from safetensors.torch import load_file

    from mpp.weights import read_metadata

    meta = read_metadata(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not an mpp classifier (metadata format {meta.get('format')!r})")
    model = ViTClassifier(ViTEncoder(**meta["encoder"]), meta["num_classes"], meta["global_pool"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta


def finetune(
    config: FinetuneConfig,
    classifier: ViTClassifier,
    splits: Splits,
    accelerator: Accelerator,
    run_dir: Path,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """Fine-tune ``classifier`` on ``splits.train`` and measure it on ``splits.test``.

    Returns:
        ``({"finetune": entry[, "finetune_ema": entry]}, trained classifier)``.
    """
    f, d = config.finetune, config.data
    world = accelerator.num_processes
    train = SeededItems(splits.train, config.seed)
    mixing = f.mixup > 0 or f.cutmix > 0
    batch = min(f.batch_size, len(train) // world)
    batch -= batch % 2 if mixing else 0  # timm's Mixup pairs each image with its mirror in the batch
    if batch < 2:
        raise ValueError(f"{len(train)} training images cannot make a batch of 2 per process on {world} processes")
    eff = effective_batch(batch, f.accum_steps, world)
    lr = f.lr if f.lr is not None else absolute_lr(f.blr, eff)
    steps_per_epoch = batches_per_epoch(len(train), batch, world) // f.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"finetune.accum_steps={f.accum_steps} leaves no full optimiser step per epoch; lower it")
    epochs, warmup = stretch_schedule(f.epochs, f.warmup_epochs, steps_per_epoch, f.min_steps)
    total = steps_per_epoch * epochs
    clipped = " (batch_size clipped to the training set)" if batch < f.batch_size else ""
    say(f"  effective batch {eff} = {batch} x {f.accum_steps} accum x {world} procs{clipped}; lr {lr:.3g} = blr "
        f"{f.blr:g} x {eff} / 256" + (" (finetune.lr set directly)" if f.lr is not None else ""))  # fmt: skip
    say(f"  {steps_per_epoch} steps/epoch x {epochs} epochs = {total} steps (warmup {warmup:g} epochs); layer decay "
        f"{f.layer_decay:g}, wd {f.weight_decay:g}, drop path {f.drop_path_rate:g}, mixup {f.mixup:g}, cutmix "
        f"{f.cutmix:g}, smoothing {f.smoothing:g}, RandAugment {f.rand_augment}, erasing {f.reprob:g}"
        + (f", EMA {f.ema_decay:g}" if f.ema else ""))  # fmt: skip

    groups = layer_decay_param_groups(classifier, f.weight_decay, f.layer_decay, classifier.depth)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(f.betas[0], f.betas[1]))
    mixup = None
    if mixing:
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                      mode="batch", label_smoothing=f.smoothing, num_classes=splits.num_classes)  # fmt: skip
    criterion = loss_for(mixup, f.smoothing)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    raw: ViTClassifier = accelerator.unwrap_model(model)
    ema = None
    if f.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw, decay=f.ema_decay)
    device = accelerator.device

    def loss_fn(m: nn.Module, batch_: Any) -> torch.Tensor:
        imgs, target = batch_
        imgs, target = imgs.to(device, non_blocking=True), torch.as_tensor(target).to(device)
        if mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from torch's, which the engine seeds per step.
            np.random.seed(int(torch.randint(2**31 - 1, ()).item()))
            imgs, target = mixup(imgs, target)
        return criterion(m(imgs), target)

    def lr_fn(epoch: float) -> float:
        return lr_at(epoch, lr, f.min_lr, warmup, epochs)

    log = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None  # noqa: SIM115
    meter, window = Throughput(), []

    def on_step(info: StepInfo) -> None:
        if ema is not None:
            ema.update(raw, step=info.step)
        meter.update(info.images)
        window.append(info.loss)
        if log is not None and (info.step % f.log_every == 0 or info.step == total):
            log.write(json.dumps({"step": info.step, "epoch": round(info.epoch_float, 4), "loss": sum(window) /
                                  len(window), "lr": info.lr, "images_per_s": round(meter.rate(reset=False), 2)})
                      + "\n")  # fmt: skip
            log.flush()

    workers = loader_workers(d.num_workers, steps_per_epoch * f.accum_steps * batch * world)
    state = TrainState()
    try:
        for epoch in range(epochs):
            state.epoch, state.batch_in_epoch = epoch, 0
            loader = epoch_loader(train, batch, epoch, rank=accelerator.process_index, world_size=world,
                                  seed=config.seed, num_workers=workers,
                                  pin_memory=device.type == "cuda")  # fmt: skip
            usable = steps_per_epoch * f.accum_steps
            batches = (b for i, b in enumerate(loader) if i < usable)
            train_one_epoch(accelerator, model, optimizer, batches, loss_fn, state, lr_fn=lr_fn,
                            steps_per_epoch=steps_per_epoch, accum_steps=f.accum_steps, clip_grad=f.clip_grad,
                            seed=config.seed, on_step=on_step)  # fmt: skip
            if epoch == 0 or (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
                say(f"  epoch {epoch + 1}/{epochs}: loss {sum(window) / max(len(window), 1):.4f}, "
                    f"{meter.rate():.0f} img/s")  # fmt: skip
            window.clear()
    finally:
        if log is not None:
            log.close()

    entries: dict[str, dict[str, Any]] = {}
    models = {"finetune": raw} | ({"finetune_ema": ema.module} if ema is not None else {})
    for name, net in models.items():
        net.eval()
        logits, target = batched(net, splits.test, accelerator, d.batch_size, d.num_workers, "test", config.progress)
        entry = classification_metrics(logits, target, splits.classes)
        entry.update(blr=f.blr, lr=lr, effective_batch=eff, epochs=epochs, warmup_epochs=warmup, steps=state.step,
                     train_size=len(train), layer_decay=f.layer_decay, drop_path_rate=f.drop_path_rate)  # fmt: skip
        entry["summary"] = (f"{'EMA, ' if name.endswith('ema') else ''}{epochs} ep ({state.step} steps), "
                            f"blr {f.blr:g}, batch {eff}, layer decay {f.layer_decay:g}")  # fmt: skip
        entries[name] = entry
    return entries, raw


def run(config: FinetuneConfig) -> Path:
    """Fine-tune the configured encoder and write results (and the model); returns the run directory."""
    f = config.finetune
    encoder, meta = stage_encoder(config, drop_path_rate=f.drop_path_rate)
    make_trainable_grid(encoder, config.img_size, config.patch_size)
    mean, std = resolve_stats(config, meta, encoder.in_chans)
    train_tf = finetune_transform(encoder.img_size, mean, std, in_chans=encoder.in_chans, rand_augment=f.rand_augment,
                                  reprob=f.reprob, scale=(f.crop_scale_min, 1.0), hflip=f.hflip)  # fmt: skip
    splits = build_splits(config, encoder, train_tf, eval_tf(config, encoder, mean, std))
    # The paper fine-tunes with average pooling + fc_norm; global_pool=token keeps the cls token instead.
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool or "avg", FINETUNE_HEAD_STD)
    accelerator = make_accelerator(config)
    say = accelerator.print
    run_dir = run_dir_of(config, "finetune")
    params = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    say(f"mpp finetune: {encoder_description(encoder, meta, classifier.global_pool)} from {config.init}, "
        f"{params / 1e6:.2f}M trainable, on {accelerator.device}")  # fmt: skip
    say(f"  {len(splits.train)} train images ({budget_text(splits.label_info)}), {len(splits.test)} test images, "
        f"{splits.num_classes} classes")  # fmt: skip
    if accelerator.is_main_process:
        save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
    entries, trained = finetune(config, classifier, splits, accelerator, run_dir, say)
    if accelerator.is_main_process:
        results = results_header(config, encoder, meta, classifier.global_pool, splits)
        results["protocols"] = entries
        write_results(run_dir, results, splits.classes)
        if f.save_model:
            save_classifier(run_dir / "classifier.safetensors", trained, mean=mean, std=std, classes=splits.classes,
                            init=config.init)  # fmt: skip
        for name, entry in entries.items():
            say(f"  {name}: top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {run_dir / 'results.json'}")
    accelerator.wait_for_everyone()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp finetune``."""
    return stage_main("mpp finetune", FinetuneConfig, "Fine-tune an encoder (or train from scratch).", run, argv)
