"""``mpp evaluate RUN_OR_ENCODER``: judge an encoder by kNN and a linear probe (and fine-tuning with ``--finetune``).

Features are extracted once and shared by kNN and the cached probe. Writes ``results.json``, a markdown table
``results.md`` (top-1, top-5, per-class accuracy per protocol) and ``confusion_<protocol>.png`` into ``output_dir``
(default: ``RUN/eval`` for a run directory, suffixed with the label budget, e.g. ``RUN/eval_10_per_class``; see
:func:`mpp.stage.default_output_dir`).

Usage::

    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml
    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml labels_per_class=10 --finetune
    mpp evaluate random model=mae_vit_tiny_patch4 --recipe recipes/evaluate_fmnist.yaml output_dir=runs/eval_scratch
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mpp.data.augment import finetune_transform
from mpp.data.transforms import pretrain_transform
from mpp.eval_config import EvaluateConfig
from mpp.finetune import FINETUNE_HEAD_STD, finetune, make_trainable_grid
from mpp.knn import knn_protocol
from mpp.models.classifier import PROBE_HEAD_STD, ViTClassifier
from mpp.probe import cached_probe, full_probe
from mpp.report import write_results
from mpp.stage import (
    budget_text,
    build_splits,
    encoder_description,
    eval_tf,
    extract_split_features,
    make_accelerator,
    move_to_grid,
    resolve_stats,
    results_header,
    run_dir_of,
    save_run_config,
    stage_encoder,
    stage_main,
)


def run(config: EvaluateConfig) -> Path:
    """kNN, linear probe and (with ``run_finetune``) fine-tuning of one encoder; returns the output directory."""
    encoder, meta = stage_encoder(config)
    move_to_grid(encoder, config)
    mean, std = resolve_stats(config, meta, encoder.in_chans)
    test_tf = eval_tf(config, encoder, mean, std)
    splits = build_splits(config, encoder, test_tf, test_tf)
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool, PROBE_HEAD_STD, head_bn=True)
    accelerator = make_accelerator(config)
    say = accelerator.print
    run_dir = run_dir_of(config, "eval")
    say(f"mpp evaluate: {encoder_description(encoder, meta, classifier.global_pool)} from {config.init}")
    say(f"  {len(splits.train)} train images ({budget_text(splits.label_info)}), {len(splits.test)} test images, "
        f"{splits.num_classes} classes, on {accelerator.device}; output {run_dir}")  # fmt: skip
    if accelerator.is_main_process:
        save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
    d = config.data
    feats = extract_split_features(classifier, splits, accelerator, d.batch_size, d.num_workers, config.progress)
    protocols: dict[str, Any] = {}
    protocols["knn"] = knn_protocol(*feats, splits.classes, config.knn, accelerator.device)
    say(f"  kNN: top-1 {protocols['knn']['top1']:.2f}%")
    if config.probe.mode == "cached":
        protocols["probe"] = cached_probe(*feats, splits.classes, config.probe, accelerator, config.seed, say)
    else:
        p = config.probe
        train_tf = pretrain_transform(encoder.img_size, mean, std, scale=(p.crop_scale_min, 1.0), hflip=p.hflip)
        probe_splits = build_splits(config, encoder, train_tf, test_tf)
        protocols["probe"] = full_probe(config, classifier, probe_splits, accelerator, say)  # type: ignore[arg-type]
    say(f"  linear probe: top-1 {protocols['probe']['top1']:.2f}%")
    if config.run_finetune:
        protocols.update(_finetune(config, mean, std, accelerator, run_dir / "finetune", say))
    if accelerator.is_main_process:
        results = results_header(config, encoder, meta, classifier.global_pool, splits)
        results["protocols"] = protocols
        write_results(run_dir, results, splits.classes)
        say(f"  results: {run_dir / 'results.md'}")
    return run_dir


def _finetune(
    config: EvaluateConfig, mean: list[float], std: list[float], accelerator: Any, out: Path, say: Any
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the encoder (drop path on, learnable position table) with ``config.finetune``."""
    f = config.finetune
    encoder, _ = stage_encoder(config, drop_path_rate=f.drop_path_rate)
    make_trainable_grid(encoder, config.img_size, config.patch_size)
    train_tf = finetune_transform(encoder.img_size, mean, std, in_chans=encoder.in_chans, rand_augment=f.rand_augment,
                                  reprob=f.reprob, scale=(f.crop_scale_min, 1.0), hflip=f.hflip)  # fmt: skip
    splits = build_splits(config, encoder, train_tf, eval_tf(config, encoder, mean, std))
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool or "avg", FINETUNE_HEAD_STD)
    out.mkdir(parents=True, exist_ok=True)
    say("  fine-tuning:")
    entries, _ = finetune(config, classifier, splits, accelerator, out, say)  # type: ignore[arg-type]
    return entries


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp evaluate``; ``--finetune`` is short for ``run_finetune=true``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--finetune" in argv:
        argv = [a for a in argv if a != "--finetune"] + ["run_finetune=true"]
    return stage_main(
        "mpp evaluate", EvaluateConfig, "kNN and linear probe (and fine-tuning) of an encoder.", run, argv
    )
