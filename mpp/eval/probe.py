"""``mpp probe``: linear probing of a frozen encoder, the MAE paper's way.

The head is ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weight trunc-normal std 0.01, bias 0) on the
pooled features (cls token after the final norm, or ``fc_norm`` of the average patch token); only the head trains,
with LARS (momentum 0.9, trust coefficient 0.001, weight decay 0), ``lr = blr * eff_batch / 256``, linear warmup
then cosine. Two modes:

- ``full`` (the paper's): every epoch pushes RandomResizedCrop + flip augmented images through the frozen encoder.
- ``cached`` (fast; the CPU recipes'): features are extracted once with the evaluation transform, then one head per
  ``blr`` in ``probe.blr_sweep`` (times each weight decay in ``probe.wd_sweep``, when given) trains on the same
  batches; the pair with the best accuracy on the validation split (``data.val_size``, else a seeded, stratified part
  carved from the training images; never the test set) is chosen, and its head's test accuracy is reported. The weight
  decay is the probe's L2 strength, chosen the way the raw-pixel logistic regression chooses its own.

Usage::

    mpp probe runs/fmnist_tiny --recipe recipes/probe_fmnist.yaml
    mpp probe init=random model=mae_vit_tiny_patch4 --recipe recipes/probe_fmnist.yaml labels_per_class=10
    accelerate launch --multi_gpu --num_processes 8 -m mpp probe RUN --recipe recipes/probe_vit_paper.yaml
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.layers import trunc_normal_
from torch import nn

from mpp.config import ProbeConfig, ProbeSettings
from mpp.config.command import command_main
from mpp.data.sampling import SeededItems, mix_seed
from mpp.data.transforms import pretrain_transform
from mpp.eval.features import batched, split_features, validation_top1
from mpp.eval.labels import carve_features
from mpp.eval.metrics import classification_metrics
from mpp.eval.session import Session, Splits
from mpp.models.classifier import PROBE_HEAD_STD, ViTClassifier
from mpp.models.vit import ViTEncoder
from mpp.train.checkpoint import Checkpoint, TrainState
from mpp.train.engine import FitHooks, StageRun, StepInfo, fit, train_images
from mpp.train.optim import Schedule, absolute_lr, effective_batch, lars_optimizer, lars_param_groups, plan_schedule


# ------------------------------------------------------------------------------------------------ cached mode
class MultiHeadProbe(nn.Module):
    """One parameter-free BatchNorm shared by ``n_heads`` linear heads (one per learning rate of a sweep).

    Sharing the BatchNorm changes nothing: without affine parameters it is the same function for every head.

    Shapes: ``[N, D] -> [n_heads, N, C]``.
    """

    def __init__(self, dim: int, num_classes: int, n_heads: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.diverged = [False] * n_heads  # set by train_cached_heads
        self.heads = nn.ModuleList()
        for _ in range(n_heads):  # built and initialised in turn: head i's weights do not depend on n_heads
            head = nn.Linear(dim, num_classes)
            trunc_normal_(head.weight, std=PROBE_HEAD_STD)
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits of every head: ``[N, D] -> [n_heads, N, C]``."""
        z = self.bn(feats)
        return torch.stack([head(z) for head in self.heads])


def _feature_batches(n: int, batch: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation, full batches only (so every step has ``batch`` samples)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    for start in range(0, n - batch + 1, batch):
        yield order[start : start + batch]


def train_cached_heads(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    settings: ProbeSettings,
    accelerator: Accelerator,
    batch_size: int,
    seed: int = 0,
    on_step: Callable[[StepInfo], Any] | None = None,
    weight_decays: list[float] | None = None,
) -> MultiHeadProbe:
    """Train one BN + linear head per absolute lr in ``lrs`` on cached features, all on the same batches.

    ``weight_decays`` gives each head its own weight decay (default: ``settings.weight_decay`` for all).

    Each head has its own LARS groups (``lr_scale`` = its lr); the loss is the sum of the heads' cross-entropies,
    whose gradients do not mix since the heads share no parameter. A head whose loss stops being finite (too large
    an lr) leaves the sum from then on and is marked in ``model.diverged``; the others carry on. Only when every head
    has diverged does the engine's non-finite-loss stop apply.
    """
    model = MultiHeadProbe(feats.shape[1], num_classes, len(lrs))
    decays = weight_decays if weight_decays is not None else [settings.weight_decay] * len(lrs)
    groups = [
        g
        for head, lr, wd in zip(model.heads, lrs, decays, strict=True)
        for g in lars_param_groups(list(head.parameters()), wd, lr_scale=lr)
    ]
    optimizer = lars_optimizer(groups, lr=lrs[0], momentum=settings.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    feats, labels = feats.to(device), labels.to(device)
    batch = min(batch_size, feats.shape[0])
    steps_per_epoch = feats.shape[0] // batch
    # The schedule runs on a unit lr; each group scales it by its own lr. min_lr is taken relative to lrs[0].
    min_ratio = settings.min_lr / lrs[0]

    alive = torch.ones(len(lrs), dtype=torch.bool, device=device)

    def loss_fn(m: nn.Module, index: torch.Tensor) -> torch.Tensor:
        logits = m(feats[index])
        target = labels[index]
        losses = torch.stack([F.cross_entropy(head_logits, target) for head_logits in logits])
        alive.logical_and_(torch.isfinite(losses.detach()))
        return losses[alive].sum() if bool(alive.any()) else losses.sum()

    schedule = Schedule(
        batch, 1, 1, 1.0, 1.0, True, min_ratio, settings.epochs, settings.warmup_epochs, steps_per_epoch
    )
    fit(
        accelerator,
        model,
        optimizer,
        loss_fn,
        schedule,
        TrainState(),
        lambda epoch, skip: _feature_batches(feats.shape[0], batch, epoch, seed),
        seed=seed,
        hooks=FitHooks(on_step=on_step),
    )
    raw: MultiHeadProbe = accelerator.unwrap_model(model)
    # A last step can break a head without a later loss to show it: check the weights too.
    finite = [all(bool(torch.isfinite(p).all()) for p in head.parameters()) for head in raw.heads]
    raw.diverged = [not (a and f) for a, f in zip(alive.cpu().tolist(), finite, strict=True)]
    return raw


@torch.no_grad()
def head_logits(model: nn.Module, feats: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Eval-mode logits of a (multi-)head on features, in chunks: ``[N, D] -> [..., N, C]`` on CPU."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model(feats[i : i + chunk].to(device)).float().cpu() for i in range(0, feats.shape[0], chunk)]
    return torch.cat(parts, dim=-2)


def cached_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: list[str],
    settings: ProbeSettings,
    accelerator: Accelerator,
    seed: int = 0,
    say: Callable[[str], None] = print,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The cached-feature probe with an lr sweep chosen on validation images; the ``probe`` entry of results.json.

    ``val`` is the stage's validation split (``data.val_size``): the heads then train on every labelled image and
    the lr is chosen on it. Without it ``probe.val_fraction`` of the labelled images is carved off for the choice.
    """
    where = "the validation split"
    if val is None:
        carved = carve_features(train_x, train_y, settings.val_fraction, seed)
        if carved is None:
            raise ValueError(
                f"{len(train_y)} training images are too few to hold out a validation split for the lr sweep"
            )
        (train_x, train_y), val = carved
        where = f"carved from train, seed {seed}"
    (fit_x, fit_y), (val_x, val_y) = (train_x, train_y), val
    train_pos = list(range(len(fit_y)))
    batch = min(settings.batch_size, len(train_pos))
    eff = effective_batch(batch, 1, 1)
    plan = plan_schedule(replace(settings, batch_size=batch, accum_steps=1), len(train_pos), 1, "probe")
    epochs, warmup = plan.epochs, plan.warmup_epochs
    settings = replace(settings, epochs=epochs, warmup_epochs=warmup)
    wds = list(settings.wd_sweep or [settings.weight_decay])
    grid = [(b, wd) for wd in wds for b in settings.blr_sweep]  # one head per (blr, weight decay)
    lr_of = {b: absolute_lr(b, eff) for b in settings.blr_sweep}
    blrs = [b for b, _ in grid]
    lrs = [lr_of[b] for b in blrs]
    steps = epochs * (len(train_pos) // batch)
    say(
        f"  cached probe: {len(train_pos)} train / {len(val_y)} val features (val: {where}), "
        f"batch {eff}, {epochs} epochs (warmup {warmup:g}) = {steps} steps, LARS"
    )
    say("  sweep: " + ", ".join(f"blr {b:g} -> lr {lr:.3g}" for b, lr in lr_of.items()))
    if len(wds) > 1:
        say(f"  weight decays: {', '.join(f'{wd:g}' for wd in wds)} (each with every blr)")
    decays = [wd for _, wd in grid]
    model = train_cached_heads(
        fit_x, fit_y, len(classes), lrs, settings, accelerator, batch, seed, weight_decays=decays
    )
    val_logits = head_logits(model, val_x)  # [K, Nv, C]
    val_top1 = [
        None if dead else 100.0 * (lg.argmax(1) == val_y).float().mean().item()
        for lg, dead in zip(val_logits, model.diverged, strict=True)
    ]
    best = max((i for i, v in enumerate(val_top1) if v is not None), key=lambda i: (val_top1[i], -i))  # ties: smaller
    sweep = [
        {"blr": b, "weight_decay": wd, "lr": lr, "val_top1": v}
        for (b, wd), lr, v in zip(grid, lrs, val_top1, strict=True)
    ]

    def tag(i: int) -> str:  # the weight decay is shown only when it was swept
        return f"blr {blrs[i]:g}" + (f", wd {grid[i][1]:g}" if len(wds) > 1 else "")

    shown = [f"{tag(i)}: " + ("diverged" if v is None else f"{v:.2f}%") for i, v in enumerate(val_top1)]
    say("  val top-1: " + ", ".join(shown) + f" -> {tag(best)}")
    test_logits = head_logits(model, test_x)[best]
    entry = classification_metrics(test_logits, test_y, classes)
    entry.update(
        mode="cached",
        sweep=sweep,
        chosen_blr=blrs[best],
        chosen_weight_decay=grid[best][1],
        lr=lrs[best],
        effective_batch=eff,
        epochs=epochs,
        warmup_epochs=warmup,
        steps=steps,
        train_size=len(train_pos),
        val_size=len(val_y),
        val_top1=val_top1[best],
    )
    entry["summary"] = f"cached, {tag(best)} chosen on val ({val_top1[best]:.2f}%), {epochs} ep, batch {eff}"
    return entry


# ------------------------------------------------------------------------------------------------ full mode
class FrozenProbe(nn.Module):
    """A :class:`ViTClassifier` with BN + linear head whose encoder stays frozen and in eval mode."""

    def __init__(self, classifier: ViTClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        for name, param in classifier.named_parameters():
            param.requires_grad = name.startswith("head.")

    def train(self, mode: bool = True) -> FrozenProbe:
        """Only the head switches mode: the frozen encoder always runs as at test time."""
        super().train(mode)
        self.classifier.encoder.eval()
        self.classifier.fc_norm.eval()
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits, with no graph kept through the frozen encoder: ``[N, C, H, W] -> [N, num_classes]``."""
        with torch.no_grad():
            feats = self.classifier.forward_features(imgs)
        return self.classifier.head(feats)


def full_probe(
    config: ProbeConfig,
    classifier: ViTClassifier,
    splits: Splits,
    accelerator: Accelerator,
    say: Callable[[str], None] = print,
    run_dir: Path | None = None,
    found: Checkpoint | None = None,
) -> dict[str, Any]:
    """The paper's probe: augmented images through the frozen encoder every epoch; returns the ``probe`` entry.

    With ``run_dir`` it logs and checkpoints there, and ``found`` (:meth:`mpp.eval.session.Session.resume`) resumes it.
    """
    s, d = config.probe, config.data
    train = SeededItems(splits.train, config.seed)
    schedule = plan_schedule(s, len(train), accelerator.num_processes, "probe", clip_batch=True)
    say("  full probe (LARS):\n" + schedule.describe("probe"))
    model = FrozenProbe(classifier)
    head = classifier.head
    optimizer = lars_optimizer(
        lars_param_groups(list(head.parameters()), s.weight_decay), lr=schedule.lr, momentum=s.momentum
    )
    device = accelerator.device

    def loss_fn(m: nn.Module, batch_: Any) -> torch.Tensor:
        imgs, target = batch_
        return F.cross_entropy(m(imgs.to(device, non_blocking=True)), torch.as_tensor(target).to(device))

    run = StageRun(config, "probe", accelerator, run_dir, found, say)
    raw = train_images(run, model, optimizer, loss_fn, schedule, train, log_every=s.log_every)
    raw.eval()
    logits, target = batched(raw, splits.test, accelerator, d.batch_size, d.num_workers, "test", config.progress)
    entry = classification_metrics(logits, target, splits.classes)
    entry.update(mode="full", **schedule.facts(), train_size=len(train))
    if (val := validation_top1(raw, splits, accelerator, d, config.progress)) is not None:
        entry["val_top1"] = val
    entry["summary"] = (
        f"full (augmented), blr {s.blr:g}, lr {schedule.lr:.3g}, batch {schedule.effective_batch}, {schedule.epochs} ep"
    )
    return entry


# ------------------------------------------------------------------------------------------------ command
def run(config: ProbeConfig) -> Path:
    """Probe the configured encoder and write results; returns the run directory."""
    s = config.probe
    session = Session.open(config, "probe", track=True)
    splits = session.splits(probe_transform(session) if s.mode == "full" else None)
    classifier = probe_classifier(session, splits)
    say = session.say
    say(f"mpp probe ({s.mode}): {session.describe(classifier.global_pool)} from {config.init}")
    say(f"{session.data_line(splits)}, on {session.accelerator.device}")
    found = session.resume() if s.mode == "full" else None
    session.save_config(splits, trackers=True)
    if s.mode == "cached":
        feats = split_features(classifier, splits, session.accelerator, config.data, config.progress)
        entry = cached_probe(
            *feats.train, *feats.test, splits.classes, s, session.accelerator, config.seed, say, val=feats.val
        )
    else:
        entry = full_probe(config, classifier, splits, session.accelerator, say, session.run_dir, found)
    if written := session.write_results(splits, classifier.global_pool, {"probe": entry}):
        say(f"  linear probe top-1 {entry['top1']:.2f}%, top-5 {entry['top5']:.2f}% -> {written}")
    session.finish()
    return session.run_dir


def probe_classifier(
    session: Session, splits: Splits, encoder: ViTEncoder | None = None, pool: str | None = None
) -> ViTClassifier:
    """The session's encoder read out as the paper's probe: pooled features, parameter-free BN, a linear head.

    ``encoder`` and ``pool`` replace the session's encoder and ``global_pool`` (a second readout of the same weights).
    """
    config = session.config
    pool, blocks = pool or config.global_pool, config.feature_blocks
    encoder = encoder or session.encoder
    return ViTClassifier(encoder, splits.num_classes, pool, PROBE_HEAD_STD, head_bn=True, feature_blocks=blocks)


def probe_transform(session: Session) -> Any:
    """The full probe's training augmentation (the paper's: random resized crop and flip) at the encoder's size."""
    p = session.config.probe  # type: ignore[attr-defined]
    return pretrain_transform(
        session.encoder.img_size, session.mean, session.std, scale=(p.crop_scale_min, 1.0), hflip=p.hflip
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp probe``."""
    return command_main("mpp probe", ProbeConfig, "Linear probe (BN + linear, LARS) of a frozen encoder.", run, argv)
