"""The baselines beside every encoder figure (raw-pixel logistic regression, the small-image CNN) and LP-FT's head."""

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

from mpp.eval.baselines import logistic_protocol
from mpp.eval.logistic import L2_GRID, fit_logistic, fit_on_raw
from mpp.eval.lpft import init_head_from_probe
from mpp.eval.session import Splits
from mpp.models import create_model
from mpp.models.classifier import ViTClassifier
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


def test_lpft_head_is_a_probe_chosen_on_validation_that_reads_raw_features():
    """The folded logistic regression reads raw features; LP-FT copies it into the classifier's head."""
    generator = torch.Generator().manual_seed(0)
    x, y = 5 + 3 * torch.randn(40, 6, generator=generator), torch.arange(40) % 2
    x[:, 0] += 4 * y  # feature 0 separates the classes
    folded = fit_on_raw((x, y), 2, 1e-3)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    assert torch.allclose(folded(x), fit_logistic((x - mean) / std, y, 2, 1e-3)(x.sub(mean).div(std)), atol=1e-4)

    encoder = create_model("mae_vit_micro_patch4", img_size=16, in_chans=1)
    classifier = ViTClassifier(encoder, 2, "avg")
    images = torch.randn(48, 1, 16, 16, generator=generator)
    labels = torch.arange(48) % 2
    images[labels == 1] += 1.5  # brighter images: a class the frozen random features can tell apart
    sets = [TensorDataset(images[i::3], labels[i::3]) for i in range(3)]
    plain = Splits(train=sets[0], test=sets[2], classes=["dark", "bright"], val=sets[1])
    config = SimpleNamespace(data=SimpleNamespace(batch_size=8, num_workers=0), seed=0, progress=False)
    said = []
    probe = init_head_from_probe(classifier, plain, Accelerator(cpu=True), config, said.append)  # type: ignore[arg-type]
    with torch.no_grad():
        val_top1 = 100.0 * (classifier.eval()(images[1::3]).argmax(1) == labels[1::3]).float().mean().item()
    assert probe["val_top1"] == val_top1 > 80 and probe["chosen_on"] == "validation images"
    assert probe["l2"] in L2_GRID and "LP-FT" in said[0]
