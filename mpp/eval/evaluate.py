"""``mpp evaluate RUN_OR_ENCODER``: judge an encoder by kNN and a linear probe (and fine-tuning with ``--finetune``).

Features are extracted once and shared by kNN and the cached probe. Writes ``results.json``, a markdown table
``results.md`` (top-1, top-5, per-class accuracy per protocol) and ``confusion_<protocol>.png`` into ``output_dir``
(default: ``RUN/eval`` for a run directory, suffixed with the label budget, e.g. ``RUN/eval_10_per_class``; see
:func:`mpp.eval.session.default_output_dir`).

Data efficiency: ``budgets=1,10,100,all`` (labels per class; ``all`` = every label) runs the protocols once per
budget, for the encoder and for the same architecture from random init (its ``variant``; ``scratch_init=...`` names
another baseline, ``compare_random=false`` drops it). Each run writes its usual results into
``<output>/<mae|scratch>/<budget>``; ``efficiency.json``, ``efficiency.md`` (top-1 per budget and protocol, MAE vs
scratch and the gain) and ``efficiency.png`` (accuracy against labels per class, log axis) go into the output directory
(default ``RUN/efficiency``). kNN and cached-probe features are extracted once per encoder and sliced per budget; the
cached probe is left out at 1 label per class, where no validation split can be held out to choose its lr
(:mod:`mpp.eval.efficiency`).

Usage::

    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml
    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml labels_per_class=10 --finetune
    mpp evaluate random model=mae_vit_tiny_patch4 --recipe recipes/evaluate_fmnist.yaml output_dir=runs/eval_scratch
    mpp evaluate runs/fmnist_tiny --recipe recipes/evaluate_fmnist.yaml budgets=1,10,100,all [--finetune]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mpp.config import EvaluateConfig
from mpp.config.command import command_main
from mpp.config.stages import at_budget, finetune_pool
from mpp.eval.efficiency import sweep
from mpp.eval.features import FeatureCache, split_features
from mpp.eval.finetune import finetune_augmentation, finetune_or_semi
from mpp.eval.knn import knn_protocol
from mpp.eval.probe import cached_probe, full_probe, probe_classifier, probe_transform
from mpp.eval.session import Session, build_splits
from mpp.models.classifier import FINETUNE_HEAD_STD, ViTClassifier


def run(config: EvaluateConfig) -> Path:
    """``mpp evaluate``: :func:`run_budget`, or with ``budgets`` the data-efficiency sweep; the output directory."""
    session = Session.open(config, "efficiency" if config.budgets else "eval", create_run_dir=not config.budgets)
    if config.budgets:
        return sweep(session, run_budget)
    return run_budget(session, at_budget(config), session.run_dir)


def run_budget(
    session: Session,
    config: EvaluateConfig,
    run_dir: Path,
    features: FeatureCache | None = None,
    skip_probe: str | None = None,
) -> Path:
    """kNN, linear probe and (with ``run_finetune``) fine-tuning of the session's encoder under one label budget.

    Args:
        session: the encoder, opened once for every budget.
        config: the evaluation at this budget (``labels_per_class`` / ``label_fraction``; ``budgets`` is ignored).
        run_dir: where this budget's results go.
        features: where kNN and the cached probe take their features from (extracted here when ``None``).
        skip_probe: why the linear probe is left out of this run (recorded under ``skipped`` in results.json);
            ``None`` runs it.

    Returns:
        ``run_dir``.
    """
    session.reseed()  # every budget starts from the random state of a freshly opened encoder, like a lone run
    splits = session.splits(config=config)
    classifier = probe_classifier(session, splits)
    accelerator, say = session.accelerator, session.say
    say(f"mpp evaluate: {session.describe(classifier.global_pool)} from {config.init}")
    say(f"{session.data_line(splits)}, on {accelerator.device}; output {run_dir}")
    session.save_config(splits, run_dir=run_dir, config=config)
    protocols: dict[str, Any] = {}
    for pool in [classifier.global_pool, *[r for r in config.readouts or [] if r != classifier.global_pool]]:
        suffix = "" if pool == classifier.global_pool else f"_{pool}"
        reader = classifier if not suffix else probe_classifier(session, splits, session.frozen_encoder(), pool)
        if suffix:
            say(f"  readout {pool}: {reader.embed_dim} features per image")
        feats = split_features(reader, splits, accelerator, config.data, config.progress, features, readout=pool)
        knn = knn_protocol(*feats.train, *feats.test, splits.classes, config.knn, accelerator.device, val=feats.val)
        protocols[f"knn{suffix}"] = knn
        say(f"  kNN{suffix}: top-1 {knn['top1']:.2f}%")
        if skip_probe is not None:
            say(f"  linear probe{suffix}: skipped ({skip_probe})")
        elif config.probe.mode == "cached":
            protocols[f"probe{suffix}"] = cached_probe(
                *feats.train, *feats.test, splits.classes, config.probe, accelerator, config.seed, say, val=feats.val
            )
        elif not suffix:  # the full probe trains through the encoder: the configured readout only
            probe_splits = session.splits(probe_transform(session), config=config)
            protocols["probe"] = full_probe(config, classifier, probe_splits, accelerator, say)  # type: ignore[arg-type]
        if f"probe{suffix}" in protocols:
            say(f"  linear probe{suffix}: top-1 {protocols[f'probe{suffix}']['top1']:.2f}%")
    if config.run_finetune:
        protocols.update(_finetune(session, config, run_dir / "finetune"))
    extra = {"skipped": {"probe": skip_probe}} if skip_probe is not None else {}
    if session.write_results(splits, classifier.global_pool, protocols, run_dir=run_dir, **extra):
        say(f"  results: {run_dir / 'results.md'}")
    return run_dir


def _finetune(session: Session, config: EvaluateConfig, out: Path) -> dict[str, Any]:
    """Fine-tune a fresh copy of the encoder (drop path on, learnable position table) with ``config.finetune``."""
    f = config.finetune
    encoder = session.fresh_encoder(f.drop_path_rate)
    train_tf = finetune_augmentation(encoder, session.mean, session.std, f)
    splits = build_splits(config, encoder, train_tf, session.eval_transform())
    classifier = ViTClassifier(encoder, splits.num_classes, finetune_pool(config), FINETUNE_HEAD_STD)
    out.mkdir(parents=True, exist_ok=True)
    session.say("  fine-tuning:")
    entries, _ = finetune_or_semi(config, session, splits, classifier, out)  # type: ignore[arg-type]
    if not f.semi.enabled:
        return entries
    # Semi-supervised: its own column; self-training's round 0 is the labels-only fine-tune, shown beside it.
    semi = {name.replace("finetune", "finetune_semi", 1): entry for name, entry in entries.items()}
    round_zero = out / "round_0" / "round.json"
    labels_only = json.loads(round_zero.read_text())["entries"] if round_zero.is_file() else {}
    return labels_only | semi


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp evaluate``; ``--finetune`` is short for ``run_finetune=true``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--finetune" in argv:
        argv = [a for a in argv if a != "--finetune"] + ["run_finetune=true"]
    description = "kNN and linear probe (and fine-tuning) of an encoder."
    return command_main("mpp evaluate", EvaluateConfig, description, run, argv)
