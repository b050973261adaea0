"""The baselines beside every encoder figure: raw-pixel logistic regression and the small-image CNN."""

import torch

from mpp.eval.baselines import fit_logistic, logistic_protocol
from mpp.models.cnn import SmallImageResNet


def test_logistic_regression_chooses_l2_on_validation_and_scores_test_once():
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 20, generator=generator)

    def draw(n):
        y = torch.arange(n) % 3
        return centres[y] + torch.randn(n, 20, generator=generator), y

    train, val, test = draw(60), draw(60), draw(300)
    said = []
    entry = logistic_protocol(train, val, test, ["a", "b", "c"], l2_grid=(1e-3, 1.0, 1e3), say=said.append)
    best = max(entry["sweep"], key=lambda s: (s["val_top1"], s["l2"]))  # ties go to the stronger regularisation
    assert entry["l2"] == best["l2"] and entry["val_top1"] == best["val_top1"] and entry["top1"] > 90
    assert entry["val_size"] == 60 and entry["train_size"] == 60 and "L2 0.001" in said[0]
    weak, strong = (fit_logistic(train[0], train[1], 3, l2).weight.norm() for l2 in (1e-3, 1e3))
    assert strong < weak


def test_small_image_resnet_keeps_the_resolution_in_its_stem():
    model = SmallImageResNet(10, in_chans=1, widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1))
    assert model.depth == 0 and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    stem = model.net.conv1(torch.randn(1, 1, 28, 28))
    assert stem.shape[-2:] == (28, 28) and isinstance(model.net.maxpool, torch.nn.Identity)
