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
from mpp import stage
from mpp.checkpoint import Checkpoint
from mpp.data.augment import finetune_transform
from mpp.engine import FitHooks, StepInfo, plan_schedule
from mpp.eval_config import FinetuneConfig
from mpp.metrics import classification_metrics
from mpp.models.classifier import FINETUNE_HEAD_STD, ViTClassifier
from mpp.models.vit import ViTEncoder
from mpp.optim import adamw, layer_decay_param_groups
from mpp.report import write_results
from mpp.runtime import atomic_path

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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
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
    splits: stage.Splits,
    accelerator: Accelerator,
    run_dir: Path | None,
    say: Callable[[str], None] = print,
    found: Checkpoint | None = None,
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """Fine-tune ``classifier`` on ``splits.train`` (from ``found`` if resuming) and measure it on ``splits.test``.

    Returns:
        ``({"finetune": entry[, "finetune_ema": entry]}, trained classifier)``.
    """
    f, d = config.finetune, config.data
    train = stage.SeededItems(splits.train, config.seed)
    mixing = f.mixup > 0 or f.cutmix > 0
    schedule = plan_schedule(f, len(train), accelerator.num_processes, "finetune", clip_batch=True, even_batch=mixing)
    say(schedule.describe("finetune"))
    say(f"  layer decay {f.layer_decay:g}, wd {f.weight_decay:g}, drop path {f.drop_path_rate:g}, mixup {f.mixup:g}, "
        f"cutmix {f.cutmix:g}, smoothing {f.smoothing:g}, RandAugment {f.rand_augment}, erasing {f.reprob:g}"
        + (f", EMA {f.ema_decay:g}" if f.ema else ""))  # fmt: skip

    groups = layer_decay_param_groups(classifier, f.weight_decay, f.layer_decay, classifier.depth)
    optimizer = adamw(groups, schedule.lr, (f.betas[0], f.betas[1]), f.fused)
    mixup = None
    if mixing:
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                      mode="batch", label_smoothing=f.smoothing, num_classes=splits.num_classes)  # fmt: skip
    criterion = loss_for(mixup, f.smoothing)
    device = accelerator.device
    ema: Any = None
    live: list[nn.Module] = []  # the unwrapped model being trained, once prepared

    def start_ema(raw: nn.Module, found: Checkpoint | None) -> None:
        nonlocal ema
        live.append(raw)
        if f.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(raw, decay=f.ema_decay)
            if found is not None and "ema" in found.optimizer_state:
                ema.module.load_state_dict(found.optimizer_state["ema"])

    def loss_fn(m: nn.Module, batch_: Any) -> torch.Tensor:
        imgs, target = batch_
        imgs, target = imgs.to(device, non_blocking=True), torch.as_tensor(target).to(device)
        if mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from torch's, which the engine seeds per step.
            np.random.seed(int(torch.randint(2**31 - 1, ()).item()))
            imgs, target = mixup(imgs, target)
        return criterion(m(imgs), target)

    def update_ema(info: StepInfo) -> None:
        if ema is not None:
            ema.update(live[0], step=info.step)

    raw = stage.train_stage(
        config, "finetune", classifier, optimizer, loss_fn, schedule, train, accelerator, run_dir, found,
        log_every=f.log_every, clip_grad=f.clip_grad, on_prepared=start_ema, hooks=FitHooks(on_step=update_ema),
        extra_state=lambda: {"ema": ema.module.state_dict()} if ema is not None else {}, say=say,
    )  # fmt: skip

    entries: dict[str, dict[str, Any]] = {}
    models = {"finetune": raw} | ({"finetune_ema": ema.module} if ema is not None else {})
    for name, net in models.items():
        net.eval()
        logits, target = stage.batched(
            net, splits.test, accelerator, d.batch_size, d.num_workers, "test", config.progress
        )
        entry = classification_metrics(logits, target, splits.classes)
        entry.update(blr=f.blr, lr=schedule.lr, effective_batch=schedule.effective_batch, epochs=schedule.epochs,
                     warmup_epochs=schedule.warmup_epochs, steps=schedule.total_steps, train_size=len(train),
                     layer_decay=f.layer_decay, drop_path_rate=f.drop_path_rate)  # fmt: skip
        entry["summary"] = (f"{'EMA, ' if name.endswith('ema') else ''}{schedule.epochs} ep "
                            f"({schedule.total_steps} steps), blr {f.blr:g}, batch {schedule.effective_batch}, "
                            f"layer decay {f.layer_decay:g}")  # fmt: skip
        entries[name] = entry
    return entries, raw


def run(config: FinetuneConfig) -> Path:
    """Fine-tune the configured encoder and write results (and the model); returns the run directory."""
    f = config.finetune
    encoder, meta = stage.stage_encoder(config, drop_path_rate=f.drop_path_rate)
    make_trainable_grid(encoder, config.img_size, config.patch_size)
    mean, std = stage.resolve_stats(config, meta, encoder.in_chans)
    train_tf = finetune_transform(encoder.img_size, mean, std, in_chans=encoder.in_chans, rand_augment=f.rand_augment,
                                  reprob=f.reprob, scale=(f.crop_scale_min, 1.0), hflip=f.hflip)  # fmt: skip
    splits = stage.build_splits(config, encoder, train_tf, stage.eval_tf(config, encoder, mean, std))
    # The paper fine-tunes with average pooling + fc_norm; global_pool=token keeps the cls token instead.
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool or "avg", FINETUNE_HEAD_STD)
    run_dir = stage.run_dir_of(config, "finetune")
    accelerator = stage.stage_accelerator(config, run_dir)
    say = accelerator.print
    found = stage.stage_checkpoint(run_dir, config, "finetune", say)
    params = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    say(f"mpp finetune: {stage.encoder_description(encoder, meta, classifier.global_pool)} from {config.init}, "
        f"{params / 1e6:.2f}M trainable, on {accelerator.device}")  # fmt: skip
    say(f"  {len(splits.train)} train images ({stage.budget_text(splits.label_info)}), {len(splits.test)} test images, "
        f"{splits.num_classes} classes")  # fmt: skip
    if accelerator.is_main_process:
        stage.save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
        accelerator.init_trackers("tensorboard")
    entries, trained = finetune(config, classifier, splits, accelerator, run_dir, say, found)
    if accelerator.is_main_process:
        results = stage.results_header(config, encoder, meta, classifier.global_pool, splits)
        results["protocols"] = entries
        write_results(run_dir, results, splits.classes)
        if f.save_model:
            save_classifier(run_dir / "classifier.safetensors", trained, mean=mean, std=std, classes=splits.classes,
                            init=config.init)  # fmt: skip
        for name, entry in entries.items():
            say(f"  {name}: top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {run_dir / 'results.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp finetune``."""
    return stage.stage_main("mpp finetune", FinetuneConfig, "Fine-tune an encoder (or train from scratch).", run, argv)
