"""Frozen features: an encoder's outputs over a dataset in order, split over processes.

:class:`FeatureCache` keeps them, so the data-efficiency sweep slices one extraction per label budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mpp.data.sampling import targets_of
from mpp.eval.session import Splits


@torch.no_grad()
def batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over every image of ``dataset`` in order: ``(outputs float32 [N, ...] on CPU, labels int64 [N])``.

    With several processes each computes every ``world``-th image and the results are gathered, so every process
    returns the whole, ordered result having computed only its share.
    """
    world, rank, n = accelerator.num_processes, accelerator.process_index, len(dataset)  # type: ignore[arg-type]
    per = -(-n // world)
    part = dataset
    if world > 1:
        mine = list(range(rank, n, world)) or [0]
        mine += [mine[-1]] * (per - len(mine))  # equal shares for the gather; the padding is cut off below
        part = Subset(dataset, mine)
    loader = DataLoader(
        part,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    outputs, labels = [], []
    for imgs, target in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with accelerator.autocast():
            out = fn(imgs.to(accelerator.device, non_blocking=True))
        outputs.append(out.float())
        labels.append(torch.as_tensor(target).to(accelerator.device))
    out, lab = torch.cat(outputs), torch.cat(labels).long()
    if world > 1:  # rank r holds items r, r + world, ...: interleave the gathered shares back into order
        rest = out.shape[1:]
        out = accelerator.gather(out).view(world, per, *rest).transpose(0, 1).reshape(world * per, *rest)[:n]
        lab = accelerator.gather(lab).view(world, per).t().reshape(-1)[:n]
    return out.cpu(), lab.cpu()


def extract_split_features(
    classifier: Any, splits: Splits, accelerator: Any, batch_size: int, num_workers: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features and labels of the train and test splits: ``(train_x, train_y, test_x, test_y)``."""
    classifier.eval().to(accelerator.device)
    fn = classifier.forward_features
    train_x, train_y = batched(fn, splits.train, accelerator, batch_size, num_workers, "train features", progress)
    test_x, test_y = batched(fn, splits.test, accelerator, batch_size, num_workers, "test features", progress)
    return train_x, train_y, test_x, test_y


class FeatureCache:
    """Features of every labelled train image and of the test split, extracted once and sliced per label budget.

    Valid because the evaluation transform is deterministic: an image's features do not depend on the budget (nor, up
    to float rounding, on the batch it was extracted in). One cache serves one encoder and one data config; only the
    label budget may change between calls (the data-efficiency sweep of :mod:`mpp.eval.efficiency`).
    """

    def __init__(self) -> None:
        # readout name (e.g. the pooling) -> (train_x, train_y, test_x, test_y); one encoder can be read out many ways
        self._feats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[int, int] = {}  # train dataset index -> row of the cached train features
        self._test: list[int] | None = None

    def features(
        self,
        classifier: Any,
        splits: Splits,
        accelerator: Any,
        batch_size: int,
        num_workers: int,
        progress: bool,
        readout: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_x, train_y, test_x, test_y)`` of ``splits``, like :func:`extract_split_features`.

        ``readout`` names the classifier's way of reading the encoder out: each is extracted once.
        """
        train, test = splits.train, splits.test
        if not isinstance(train, Subset) or not isinstance(test, Subset):
            raise TypeError("FeatureCache needs the Subset splits of build_splits")
        if self._test is not None and list(test.indices) != self._test:
            raise RuntimeError("FeatureCache: the test split changed; a cache serves one encoder and one data config")
        if readout not in self._feats:
            labelled = [i for i, t in enumerate(targets_of(train.dataset)) if t >= 0]
            everything = Splits(Subset(train.dataset, labelled), test, splits.classes)
            # DataLoaders draw a seed from torch's global generator: forked, so every budget then starts its probe from
            # the same random state, whether it extracted the features or found them here.
            with torch.random.fork_rng(devices=[]):
                self._feats[readout] = extract_split_features(
                    classifier, everything, accelerator, batch_size, num_workers, progress
                )
            self._rows = {index: row for row, index in enumerate(labelled)}
            self._test = list(test.indices)
        rows = torch.tensor([self._rows[i] for i in train.indices], dtype=torch.long)
        train_x, train_y, test_x, test_y = self._feats[readout]
        return train_x[rows], train_y[rows], test_x, test_y

    def val_features(self, splits: Splits, readout: str = "") -> tuple[torch.Tensor, torch.Tensor] | None:
        """After :meth:`features`: the validation split's features, sliced from the same extraction (or ``None``)."""
        if splits.val is None or readout not in self._feats:
            return None
        if not isinstance(splits.val, Subset):
            raise TypeError("FeatureCache needs the Subset splits of build_splits")
        rows = torch.tensor([self._rows[i] for i in splits.val.indices], dtype=torch.long)
        return self._feats[readout][0][rows], self._feats[readout][1][rows]


@dataclass
class SplitFeatures:
    """Pooled features and labels of a stage's splits, ``(x, y)`` each; ``val`` is ``None`` without one."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None = None


def split_features(
    classifier: Any,
    splits: Splits,
    accelerator: Any,
    data: Any,
    progress: bool,
    cache: FeatureCache | None = None,
    readout: str = "",
) -> SplitFeatures:
    """Features of the train, validation and test splits, from ``cache`` (sliced) or extracted now.

    ``data`` is the stage's data section (``batch_size``, ``num_workers``); ``readout`` names the classifier's readout
    in the cache.
    """
    b, w = data.batch_size, data.num_workers
    if cache is not None:
        train_x, train_y, test_x, test_y = cache.features(classifier, splits, accelerator, b, w, progress, readout)
        return SplitFeatures((train_x, train_y), (test_x, test_y), cache.val_features(splits, readout))
    train_x, train_y, test_x, test_y = extract_split_features(classifier, splits, accelerator, b, w, progress)
    val = None
    if splits.val is not None:
        val = batched(classifier.forward_features, splits.val, accelerator, b, w, "val features", progress)
    return SplitFeatures((train_x, train_y), (test_x, test_y), val)


def validation_top1(model: Any, splits: Splits, accelerator: Any, data: Any, progress: bool) -> float | None:
    """Top-1 (%) of a trained classifier on the validation split, what recipe choices are made on (``None``: none)."""
    if splits.val is None:
        return None
    logits, target = batched(model, splits.val, accelerator, data.batch_size, data.num_workers, "val", progress)
    return 100.0 * (logits.argmax(1) == target).float().mean().item()
