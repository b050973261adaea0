"""The validation split: stratified, seeded, the same images in pretraining and evaluation, never trained on."""

import pytest
import torch

from mpp.config import DataConfig, EvaluateConfig, build_config
from mpp.data.holdout import validation_indices, without_validation
from mpp.data.pretraining import make_dataset
from mpp.data.transforms import eval_transform
from mpp.eval.session import build_splits, open_encoder

MICRO = "mae_vit_micro_patch4"
SYNTH = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0"]


def test_validation_split_is_stratified_seeded_and_exact():
    targets = [c for c in range(4) for _ in range(25)] + [-1] * 7  # 4 classes x 25, and unlabeled images
    val = validation_indices(targets, 20, seed=3)
    assert len(val) == 20 and val == sorted(val) and all(targets[i] >= 0 for i in val)
    assert [sum(targets[i] == c for i in val) for c in range(4)] == [5, 5, 5, 5]
    assert val == validation_indices(targets, 20, seed=3) != validation_indices(targets, 20, seed=4)
    kept, held = without_validation(targets, 20, seed=3)
    assert held == val and sorted(kept + held) == list(range(len(targets)))
    assert without_validation(targets, None) == (list(range(len(targets))), [])
    with pytest.raises(ValueError, match="data.val_size=100"):
        validation_indices(targets, 100)
    with pytest.raises(ValueError, match="needs labels"):
        validation_indices([-1, -1], 1)


def test_pretraining_and_evaluation_hold_out_the_same_images():
    data = DataConfig(source="synthetic", synthetic_size=64, val_size=16)
    pretraining = make_dataset(data, 0, None, 1, 28)
    config = build_config(EvaluateConfig, None, [f"model={MICRO}", *SYNTH, "data.val_size=16",
                                                 "labels_per_class=8"], init="random")  # fmt: skip
    encoder, _ = open_encoder(config)
    tf = eval_transform(encoder.img_size, [0.5], [0.5])
    splits = build_splits(config, encoder, tf, tf)
    val, pretrained, labelled = set(splits.val.indices), set(pretraining.indices), set(splits.train.indices)
    assert len(val) == 16 and not val & pretrained and not val & labelled and len(pretrained) == 48
    assert len(labelled) == 32 and splits.label_info["val_size"] == 16 and splits.label_info["train_available"] == 48
    assert torch.equal(splits.val[0][0], tf(pretraining.dataset[splits.val.indices[0]][0]))  # evaluation transform
