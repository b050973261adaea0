"""The baselines every encoder figure stands beside, on exactly the same labelled images.

- **Raw pixels**: the evaluation-transform images flattened; kNN with the encoder's protocol (:mod:`mpp.neighbours`)
  and a multinomial logistic regression whose L2 strength is chosen on validation images, never on the test split.
- **A CNN from scratch** (:class:`mpp.models.cnn.SmallImageResNet`): trained by the fine-tuning path with the stage's
  own recipe and augmentation (:func:`mpp.eval.finetune.finetune`), so it gets the ViT fine-tune's optimiser steps.

The same ViT from scratch is the efficiency sweep's ``scratch`` encoder (:mod:`mpp.eval.efficiency`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mpp.config import EvaluateConfig
from mpp.eval.features import FeatureCache, split_features
from mpp.eval.finetune import finetune, finetune_augmentation
from mpp.eval.knn import knn_protocol
from mpp.eval.labels import carve_features
from mpp.eval.logistic import L2_GRID, chosen_logistic
from mpp.eval.metrics import classification_metrics
from mpp.eval.session import Session
from mpp.models.cnn import SmallImageResNet
from mpp.runtime import check_output_dir


def flatten(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C*H*W]`` float32."""
    return images.reshape(images.shape[0], -1).float()


def logistic_protocol(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    classes: Sequence[str],
    l2_grid: Sequence[float] = L2_GRID,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Logistic regression on features (:func:`chosen_logistic`): L2 chosen on ``val``, scored once on ``test``.

    Returns the results.json entry.
    """
    start = time.perf_counter()
    (train_x, _), (val_x, _), (test_x, test_y) = train, val, test
    model, best, val_top1 = chosen_logistic(train, val, len(classes), l2_grid)
    with torch.no_grad():
        entry = classification_metrics(model(test_x), test_y, classes)
    say(
        "  logistic regression, val top-1: "
        + ", ".join(f"L2 {l2:g}: {v:.2f}%" for l2, v in val_top1.items())
        + f" -> L2 {best:g}"
    )
    entry.update(
        l2=best,
        val_top1=val_top1[best],
        sweep=[{"l2": k, "val_top1": v} for k, v in val_top1.items()],
        train_size=int(train_x.shape[0]),
        val_size=int(val_x.shape[0]),
        seconds=round(time.perf_counter() - start, 1),
    )
    entry["summary"] = f"L2 {best:g} chosen on {val_x.shape[0]} validation images ({val_top1[best]:.2f}%)"
    return entry


# ------------------------------------------------------------------------------------------------ runners
class PixelReader(torch.nn.Module):
    """Reads images as features: the evaluation-transform pixels, flattened (what :func:`split_features` extracts)."""

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C*H*W]``."""
        return flatten(imgs)


def pixel_budget(
    session: Session, config: EvaluateConfig, run_dir: Path, cache: FeatureCache | None = None, skip: str | None = None
) -> Path:
    """Raw pixels at one label budget: kNN and logistic regression; writes results.json into ``run_dir``.

    ``skip`` is the probe's reason to be left out (it does not apply here: logistic regression needs a validation
    split, the stage's own, or a tenth of the labelled images when it has at least two of every class).
    """
    splits = session.splits(config=config)
    accelerator, say = session.accelerator, session.say
    say(f"pixels: {session.data_line(splits)}; output {run_dir}")
    session.save_config(splits, run_dir=run_dir, config=config)
    feats = split_features(PixelReader(), splits, accelerator, config.data, config.progress, cache)
    protocols: dict[str, Any] = {
        "knn": knn_protocol(*feats.train, *feats.test, splits.classes, config.knn, val=feats.val)
    }
    train, val, skipped = feats.train, feats.val, {}
    if val is None and (carved := carve_features(*feats.train, 0.1, config.seed)) is not None:
        train, val = carved
    if val is not None:
        protocols["logistic"] = logistic_protocol(train, val, feats.test, splits.classes, say=say)
    else:
        skipped["logistic"] = "no validation images to choose L2 on: set data.val_size"
    say("  pixels: " + ", ".join(f"{name} {entry['top1']:.2f}%" for name, entry in protocols.items()))
    extra: dict[str, Any] = {"skipped": skipped} if skipped else {}
    h, w = session.encoder.img_size
    extra.update(
        init="pixels", variant=None, encoder=None, encoder_desc=f"raw pixels ({session.encoder.in_chans}x{h}x{w})"
    )
    session.write_results(splits, "pixels", protocols, run_dir=run_dir, **extra)
    return run_dir


def cnn_budget(
    session: Session, config: EvaluateConfig, run_dir: Path, cache: FeatureCache | None = None, skip: str | None = None
) -> Path:
    """A small-image ResNet trained from scratch on the budget's labelled images with the fine-tune recipe.

    Same images, augmentation, optimiser steps and schedule as the ViT's ``finetune`` (``config.finetune``); one lr
    for every layer (no layer decay); widths and blocks from ``config.cnn``. With ``cnn.blr_sweep`` (at budgets up to
    ``cnn.blr_sweep_max_per_class``) one CNN trains per base lr (in ``run_dir/blr<value>``) and the one best on the
    validation images is reported, each lr's validation top-1 beside it; otherwise it trains once at ``cnn.blr`` (or
    the fine-tune recipe's).
    """
    f, c = config.finetune, config.cnn
    splits = session.splits(finetune_augmentation(session.encoder, session.mean, session.std, f), config=config)
    session.save_config(splits, run_dir=run_dir, config=config)

    def build() -> SmallImageResNet:
        return SmallImageResNet(splits.num_classes, session.encoder.in_chans, c.widths, c.blocks, f.drop_path_rate)

    params = sum(p.numel() for p in build().parameters()) / 1e6  # built before the reseed: draws nothing used below
    desc = f"ResNet from scratch (small-image stem, widths {c.widths}, blocks {c.blocks}, {params:.2f}M)"
    session.say(f"cnn: {desc}\n{session.data_line(splits)}")
    tried: dict[str, dict[str, Any]] = {}
    sweep = c.blr_sweep if c.swept_at(config.labels_per_class) else []
    for blr in sweep or [c.blr or f.blr]:
        session.reseed()  # every lr from the same initialisation and batches: only the lr differs
        where = check_output_dir(run_dir / f"blr{blr:g}") if sweep else run_dir
        if sweep:
            session.say(f"cnn: blr {blr:g}")
        one = replace(config, finetune=replace(f, blr=blr))
        tried[f"{blr:g}"], _ = finetune(one, build(), splits, session.accelerator, where, session.say)  # type: ignore[arg-type]
    chosen = max(tried, key=lambda b: tried[b]["finetune"].get("val_top1") or 0.0)  # one entry without a sweep
    entries = tried[chosen]
    if sweep:
        val = {b: e["finetune"].get("val_top1") for b, e in tried.items()}
        entries["finetune"] |= {"blr": float(chosen), "val_top1_by_blr": val}
        session.say(f"cnn: blr {chosen} chosen on validation ({', '.join(f'{b}: {v:.2f}%' for b, v in val.items())})")
    session.write_results(
        splits,
        "avg",
        entries,
        run_dir=run_dir,
        init="scratch",
        variant="resnet",
        encoder={"widths": list(c.widths), "blocks": list(c.blocks), "in_chans": session.encoder.in_chans},
        encoder_desc=desc,
    )
    return run_dir
