"""LP-FT: fine-tuning that starts from a linear probe's head (``finetune.head_init=probe``).

A random head sends large, uninformed gradients into the pretrained features during the first steps and distorts them
before the head is of any use; fitting the head on the frozen features first starts fine-tuning near a solution
(Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022). The
probe is a logistic regression on the features the fine-tune head reads (its ``global_pool``; evaluation transform,
no augmentation, dropout and drop path off), its L2 chosen on the validation images (:mod:`mpp.eval.logistic`). A
stage without validation images carves a tenth of the labelled ones to choose on; with too few for that it keeps
:data:`NO_VALIDATION_L2`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from mpp.config import StageConfig
from mpp.eval.features import batched
from mpp.eval.labels import carve_features
from mpp.eval.logistic import L2_GRID, chosen_logistic, fit_on_raw
from mpp.eval.session import Splits
from mpp.models.classifier import ViTClassifier

NO_VALIDATION_L2 = 1e-2  # the middle of L2_GRID, where nothing can choose


def _features(classifier: ViTClassifier, dataset: Any, accelerator: Accelerator, config: StageConfig) -> Any:
    """Frozen features and labels of ``dataset``, as the head reads them."""
    d = config.data
    return batched(classifier.forward_features, dataset, accelerator, d.batch_size, d.num_workers, "", config.progress)


def init_head_from_probe(
    classifier: ViTClassifier,
    plain: Splits,
    accelerator: Accelerator,
    config: StageConfig,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Set ``classifier.head`` (a linear layer) to a logistic regression fitted on its frozen features.

    Args:
        classifier: the fine-tune classifier, before training.
        plain: the stage's splits with the evaluation transform (the labelled images and, if any, validation ones).
        accelerator: where features are computed.
        config: the stage (its data loader settings).
        say: where the one-line summary goes.

    Returns:
        What results.json records of the probe: its L2, validation top-1 (``None`` when not chosen) and images.
    """
    if not isinstance(classifier.head, torch.nn.Linear):
        raise ValueError("finetune.head_init=probe needs a plain linear head (no BatchNorm before it)")
    was_training = classifier.training
    classifier.eval().to(accelerator.device)
    train = _features(classifier, plain.train, accelerator, config)
    val = _features(classifier, plain.val, accelerator, config) if plain.val is not None else None
    if val is None and (carved := carve_features(*train, 0.1, config.seed)) is not None:
        _, l2, val_top1 = chosen_logistic(*carved, plain.num_classes, L2_GRID)  # chosen on the carve ...
        probe, source = fit_on_raw(train, plain.num_classes, l2), "a tenth of the labelled images"  # ... fit on all
    elif val is not None:
        (probe, l2, val_top1), source = chosen_logistic(train, val, plain.num_classes, L2_GRID), "validation images"
    else:
        l2, val_top1, source = NO_VALIDATION_L2, {}, "nothing: fixed (too few labels to carve a validation part)"
        probe = fit_on_raw(train, plain.num_classes, l2)
    with torch.no_grad():
        classifier.head.weight.copy_(probe.weight.to(classifier.head.weight))
        classifier.head.bias.copy_(probe.bias.to(classifier.head.bias))
    classifier.train(was_training)
    chosen = val_top1.get(l2)
    say(
        f"  head from a linear probe (LP-FT): logistic regression on {train[0].shape[0]} images' frozen "
        f"{classifier.global_pool} features, L2 {l2:g} chosen on {source}"
        + (f" ({chosen:.2f}% there)" if chosen is not None else "")
    )
    return {"l2": l2, "val_top1": chosen, "chosen_on": source, "train_size": int(train[0].shape[0])}
