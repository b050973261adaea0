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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from mpp.config import FinetuneConfig, FinetuneSettings
from mpp.config.command import command_main
from mpp.config.stages import finetune_pool
from mpp.data.sampling import SeededItems
from mpp.data.transforms import finetune_transform
from mpp.eval.features import batched, validation_top1
from mpp.eval.metrics import classification_metrics
from mpp.eval.session import Session, Splits
from mpp.formats.native import save_classifier
from mpp.models.classifier import FINETUNE_HEAD_STD, ViTClassifier
from mpp.models.vit import ViTEncoder
from mpp.train.checkpoint import Checkpoint
from mpp.train.engine import FitHooks, StageRun, StepInfo, train_images
from mpp.train.optim import adamw, layer_decay_param_groups, plan_schedule


def loss_for(mixup: Mixup | None, smoothing: float) -> nn.Module:
    """Soft-target CE under mixup/cutmix (labels already smoothed by timm's Mixup), else (smoothed) CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


class EmaTracker:
    """An optional EMA of the model being fine-tuned (timm's ``ModelEmaV3``), restored on resume and checkpointed."""

    def __init__(self, decay: float | None) -> None:
        self.decay = decay
        self.ema: Any = None
        self.live: nn.Module | None = None  # the unwrapped model being trained, once prepared

    def start(self, raw: nn.Module, found: Checkpoint | None) -> None:
        """After ``accelerator.prepare``: follow ``raw``, from the checkpointed EMA when resuming."""
        self.live = raw
        if self.decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(raw, decay=self.decay)
            if found is not None and "ema" in found.optimizer_state:
                self.ema.module.load_state_dict(found.optimizer_state["ema"])

    def update(self, info: StepInfo) -> None:
        """After each optimiser step."""
        if self.ema is not None:
            self.ema.update(self.live, step=info.step)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}


def make_mixup(f: FinetuneSettings, num_classes: int) -> Mixup | None:
    """Timm's Mixup/CutMix with label smoothing, or ``None`` when both are off."""
    if f.mixup <= 0 and f.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=f.mixup,
        cutmix_alpha=f.cutmix,
        prob=f.mixup_prob,
        switch_prob=f.mixup_switch_prob,
        mode="batch",
        label_smoothing=f.smoothing,
        num_classes=num_classes,
    )


def finetune(
    config: FinetuneConfig,
    classifier: ViTClassifier,
    splits: Splits,
    accelerator: Accelerator,
    run_dir: Path | None,
    say: Callable[[str], None] = print,
    found: Checkpoint | None = None,
    semi: Any = None,
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """Fine-tune ``classifier`` on ``splits.train`` (from ``found`` if resuming) and measure it on ``splits.test``.

    ``semi`` (:class:`mpp.eval.semi.FixMatch`) adds unlabeled images to every item and its term to the loss;
    mixup is then off (the labelled term is smoothed cross-entropy).

    Returns:
        ``({"finetune": entry[, "finetune_ema": entry]}, trained classifier)``.
    """
    f, d = config.finetune, config.data
    train = SeededItems(semi.items(splits.train) if semi is not None else splits.train, config.seed)
    mixup = make_mixup(f, splits.num_classes) if semi is None else None
    schedule = plan_schedule(
        f, len(train), accelerator.num_processes, "finetune", clip_batch=True, even_batch=mixup is not None
    )
    say(schedule.describe("finetune"))
    say(
        f"  layer decay {f.layer_decay:g}, wd {f.weight_decay:g}, drop path {f.drop_path_rate:g}, "
        + (f"mixup {f.mixup:g}, cutmix {f.cutmix:g}, " if semi is None else "no mixup (FixMatch), ")
        + f"smoothing {f.smoothing:g}, RandAugment {f.rand_augment}, erasing {f.reprob:g}"
        + (f", EMA {f.ema_decay:g}" if f.ema else "")
    )
    groups = layer_decay_param_groups(classifier, f.weight_decay, f.layer_decay, classifier.depth)
    optimizer = adamw(groups, schedule.lr, (f.betas[0], f.betas[1]), f.fused)
    criterion = loss_for(mixup, f.smoothing)
    device = accelerator.device
    ema = EmaTracker(f.ema_decay if f.ema else None)

    def loss_fn(m: nn.Module, batch_: Any) -> torch.Tensor:
        if semi is not None:
            return semi.loss(m, batch_, criterion, device, ema.ema.module if ema.ema is not None else None)
        imgs, target = batch_
        imgs, target = imgs.to(device, non_blocking=True), torch.as_tensor(target).to(device)
        if mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from torch's, which the engine seeds per step.
            np.random.seed(int(torch.randint(2**31 - 1, ()).item()))
            imgs, target = mixup(imgs, target)
        return criterion(m(imgs), target)

    run = StageRun(config, "finetune", accelerator, run_dir, found, say)
    start = time.perf_counter()
    raw = train_images(
        run,
        classifier,
        optimizer,
        loss_fn,
        schedule,
        train,
        log_every=f.log_every,
        clip_grad=f.clip_grad,
        on_prepared=ema.start,
        hooks=FitHooks(on_step=ema.update if semi is None else semi.on_step(ema.update, run_dir, accelerator)),
        extra_state=ema.state,
    )
    minutes = round((time.perf_counter() - start) / 60, 2)  # this session's training time (a resumed run: its part)
    entries: dict[str, dict[str, Any]] = {}
    models = {"finetune": raw} | ({"finetune_ema": ema.ema.module} if ema.ema is not None else {})
    for name, net in models.items():
        net.eval()
        logits, target = batched(net, splits.test, accelerator, d.batch_size, d.num_workers, "test", config.progress)
        entry = classification_metrics(logits, target, splits.classes)
        if (val := validation_top1(net, splits, accelerator, d, config.progress)) is not None:
            entry["val_top1"] = val  # what recipe choices are made on; the test figure above is never used for them
        facts = {
            "train_size": len(train),
            "layer_decay": f.layer_decay,
            "drop_path_rate": f.drop_path_rate,
            "train_minutes": minutes,
        }
        if pool := getattr(raw, "global_pool", None):  # the head's readout (a CNN baseline has none)
            facts["global_pool"] = pool
        entry.update(schedule.facts(), **facts)
        if semi is not None:
            entry["semi"] = semi.summary()
        entry["summary"] = (
            f"{'EMA, ' if name.endswith('ema') else ''}{schedule.epochs} ep ({schedule.total_steps} steps), "
            f"blr {f.blr:g}, batch {schedule.effective_batch}, layer decay {f.layer_decay:g}"
        )
        entries[name] = entry
    return entries, raw


def run(config: FinetuneConfig) -> Path:
    """Fine-tune the configured encoder and write results (and the model); returns the run directory."""
    f = config.finetune
    session = Session.open(config, "finetune", trainable=True, drop_path_rate=f.drop_path_rate, track=True)
    splits = session.splits(finetune_augmentation(session.encoder, session.mean, session.std, f))
    # The paper fine-tunes with average pooling + fc_norm; global_pool=token keeps the cls token instead.
    classifier = ViTClassifier(session.encoder, splits.num_classes, finetune_pool(config), FINETUNE_HEAD_STD)
    say = session.say
    found = session.resume()
    params = sum(p.numel() for p in classifier.parameters() if p.requires_grad) / 1e6
    say(f"mpp finetune: {session.describe(classifier.global_pool)} from {config.init}, {params:.2f}M trainable")
    say(f"{session.data_line(splits)}, on {session.accelerator.device}")
    session.save_config(splits, trackers=True)
    entries, trained = finetune_or_semi(config, session, splits, classifier, session.run_dir, found)
    if written := session.write_results(splits, classifier.global_pool, entries):
        if f.save_model:
            facts = {"mean": session.mean, "std": session.std, "classes": splits.classes, "init": config.init}
            save_classifier(session.run_dir / "classifier.safetensors", trained, **facts)
        for name, entry in entries.items():
            say(f"  {name}: top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {written}")
    session.finish()
    return session.run_dir


def finetune_or_semi(
    config: FinetuneConfig,
    session: Session,
    splits: Splits,
    classifier: ViTClassifier,
    run_dir: Path,
    found: Checkpoint | None = None,
) -> tuple[dict[str, dict[str, Any]], ViTClassifier]:
    """The fine-tune ``config.finetune`` asks for: with labels only, or semi-supervised (``finetune.semi``).

    ``mpp finetune`` and ``mpp evaluate --finetune`` both train through here, so the same keys do the same thing in
    both. Returns the result entries (``finetune`` and, with an EMA, ``finetune_ema``) and the trained classifier.
    """
    semi, say = config.finetune.semi, session.say
    if semi.enabled and semi.method == "selftrain":  # rounds, each from a fresh encoder, in run_dir/round_<r>
        from mpp.eval.semi import self_train

        return self_train(config, session, splits, finetune, run_dir)
    probe = None
    if config.finetune.head_init == "probe" and found is None:  # a resumed run's head is in its checkpoint
        from mpp.eval.lpft import init_head_from_probe

        plain = session.splits(config=config)  # the same labelled images with the evaluation transform
        probe = init_head_from_probe(classifier, plain, session.accelerator, config, say)
    term = None
    if semi.enabled:  # fixmatch: unlabeled images in every step
        from mpp.eval.semi import FixMatch

        term = FixMatch.of(config, session, splits)
    entries, trained = finetune(config, classifier, splits, session.accelerator, run_dir, say, found, term)
    for entry in entries.values():
        entry["head_init"] = config.finetune.head_init
        if probe is not None:
            entry["head_probe"] = probe
    return entries, trained


def finetune_augmentation(encoder: ViTEncoder, mean: list[float], std: list[float], f: FinetuneSettings) -> Any:
    """The fine-tuning training transform of ``f`` at the encoder's size, by timm (:mod:`mpp.data.transforms`)."""
    return finetune_transform(
        encoder.img_size,
        mean,
        std,
        in_chans=encoder.in_chans,
        rand_augment=f.rand_augment,
        reprob=f.reprob,
        scale=(f.crop_scale_min, 1.0),
        hflip=f.hflip,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp finetune``."""
    return command_main("mpp finetune", FinetuneConfig, "Fine-tune an encoder (or train from scratch).", run, argv)
