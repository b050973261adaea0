"""``mpp evaluate RUN_OR_ENCODER``: judge an encoder by kNN and a linear probe (and fine-tuning with ``--finetune``).

Features are extracted once and shared by kNN and the cached probe. Writes ``results.json``, a markdown table
``results.md`` (top-1, top-5, per-class accuracy per protocol) and ``confusion_<protocol>.png`` into ``output_dir``
(default: ``RUN/eval`` for a run directory, suffixed with the label budget, e.g. ``RUN/eval_10_per_class``; see
:func:`mpp.stage.default_output_dir`).

Data efficiency: ``budgets=1,10,100,all`` (labels per class; ``all`` = every label) runs the protocols once per
budget, for the encoder and for the same architecture from random init (its ``variant``; ``scratch_init=...`` names
another baseline, ``compare_random=false`` drops it). Each run writes its usual results into
``<output>/<mae|scratch>/<budget>``; ``efficiency.json``, ``efficiency.md`` (top-1 per budget and protocol, MAE vs
scratch and the gain) and ``efficiency.png`` (accuracy against labels per class, log axis) go into the output directory
(default ``RUN/efficiency``). kNN and cached-probe features are extracted once per encoder and sliced per budget; the
cached probe is left out at 1 label per class, where no validation split can be held out to choose its lr
(:mod:`mpp.efficiency`).

Usage::

    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml
    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml labels_per_class=10 --finetune
    mpp evaluate random model=mae_vit_tiny_patch4 --recipe recipes/evaluate_fmnist.yaml output_dir=runs/eval_scratch
    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml budgets=1,10,100,all [--finetune]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mpp import stage
from mpp.data.augment import finetune_transform
from mpp.data.transforms import pretrain_transform
from mpp.efficiency import sweep
from mpp.eval_config import EvaluateConfig
from mpp.finetune import FINETUNE_HEAD_STD, finetune, make_trainable_grid
from mpp.knn import knn_protocol
from mpp.models.classifier import PROBE_HEAD_STD, ViTClassifier
from mpp.probe import cached_probe, full_probe
from mpp.report import write_results


def run(config: EvaluateConfig) -> Path:
    """``mpp evaluate``: :func:`run_budget`, or with ``budgets`` the data-efficiency sweep; the output directory."""
    if config.budgets:
        return sweep(config, run_budget)
    return run_budget(config)


def run_budget(
    config: EvaluateConfig, features: stage.FeatureCache | None = None, skip_probe: str | None = None
) -> Path:
    """kNN, linear probe and (with ``run_finetune``) fine-tuning of one encoder under one label budget.

    Args:
        config: the evaluation; its ``budgets`` is ignored.
        features: where kNN and the cached probe take their features from (extracted here when ``None``).
        skip_probe: why the linear probe is left out of this run (recorded under ``skipped`` in results.json);
            ``None`` runs it.

    Returns:
        The output directory.
    """
    encoder, meta = stage.stage_encoder(config)
    stage.move_to_grid(encoder, config)
    mean, std = stage.resolve_stats(config, meta, encoder.in_chans)
    test_tf = stage.eval_tf(config, encoder, mean, std)
    splits = stage.build_splits(config, encoder, test_tf, test_tf)
    classifier = ViTClassifier(encoder, splits.num_classes, config.global_pool, PROBE_HEAD_STD, head_bn=True,
                               feature_blocks=config.feature_blocks)  # fmt: skip
    accelerator = stage.stage_accelerator(config)
    say = accelerator.print
    run_dir = stage.run_dir_of(config, "eval")
    say(f"mpp evaluate: {stage.encoder_description(encoder, meta, classifier.global_pool)} from {config.init}")
    say(f"  {len(splits.train)} train images ({stage.budget_text(splits.label_info)}), {len(splits.test)} test images, "
        f"{splits.num_classes} classes, on {accelerator.device}; output {run_dir}")  # fmt: skip
    if accelerator.is_main_process:
        stage.save_run_config(run_dir, config, mean=mean, std=std, **splits.label_info)
    d = config.data
    extract = features.features if features is not None else stage.extract_split_features
    feats = extract(classifier, splits, accelerator, d.batch_size, d.num_workers, config.progress)
    protocols: dict[str, Any] = {}
    protocols["knn"] = knn_protocol(*feats, splits.classes, config.knn, accelerator.device)
    say(f"  kNN: top-1 {protocols['knn']['top1']:.2f}%")
    if skip_probe is not None:
        say(f"  linear probe: skipped ({skip_probe})")
    elif config.probe.mode == "cached":
        protocols["probe"] = cached_probe(*feats, splits.classes, config.probe, accelerator, config.seed, say)
    else:
        p = config.probe
        train_tf = pretrain_transform(encoder.img_size, mean, std, scale=(p.crop_scale_min, 1.0), hflip=p.hflip)
        probe_splits = stage.build_splits(config, encoder, train_tf, test_tf)
        protocols["probe"] = full_probe(config, classifier, probe_splits, accelerator, say)  # type: ignore[arg-type]
    if "probe" in protocols:
        say(f"  linear probe: top-1 {protocols['probe']['top1']:.2f}%")
    if config.run_finetune:
        protocols.update(_finetune(config, mean, std, accelerator, run_dir / "finetune", say))
    if accelerator.is_main_process:
        results = stage.results_header(config, encoder, meta, classifier.global_pool, splits)
        results["protocols"] = protocols
        if skip_probe is not None:
            results["skipped"] = {"probe": skip_probe}
        write_results(run_dir, results, splits.classes)
        say(f"  results: {run_dir / 'results.md'}")
    return run_dir


def _finetune(
    config: EvaluateConfig, mean: list[float], std: list[float], accelerator: Any, out: Path, say: Any
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the encoder (drop path on, learnable position table) with ``config.finetune``."""
    f = config.finetune
    encoder, _ = stage.stage_encoder(config, drop_path_rate=f.drop_path_rate)
    make_trainable_grid(encoder, config.img_size, config.patch_size)
    train_tf = finetune_transform(encoder.img_size, mean, std, in_chans=encoder.in_chans, rand_augment=f.rand_augment,
                                  reprob=f.reprob, scale=(f.crop_scale_min, 1.0), hflip=f.hflip)  # fmt: skip
    splits = stage.build_splits(config, encoder, train_tf, stage.eval_tf(config, encoder, mean, std))
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
    return stage.stage_main(
        "mpp evaluate", EvaluateConfig, "kNN and linear probe (and fine-tuning) of an encoder.", run, argv
    )
