"""Online kNN monitor: does the encoder learn anything while it pretrains?

A seeded subset of the labelled *training* images (never a test split) is drawn once, cut into a memory bank and
queries, and kept as a preprocessed tensor. Each reading passes it through the encoder, pools the tokens both ways
the evaluation stages do (``token``: cls after the final norm; ``avg``: mean patch token before the final norm, then a
parameter-free LayerNorm, as :class:`mpp.models.ViTClassifier`), and scores weighted cosine kNN
(:func:`mpp.knn.knn_scores`, k 20, T 0.07 by default). The reading of the randomly initialised model is taken once at
the start, so every later reading can be compared with what no pretraining gives.

The subset is small (a few thousand images) so that a reading costs seconds, not the minutes a full 60k-image kNN
takes; its absolute value is lower than ``mpp knn``'s full-bank one, but gains over random init carry over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mpp.knn import knn_scores
from mpp.models.vit import ViTEncoder
from mpp.sampling import mix_seed
from mpp.stage import targets_of

CACHE_FP32_BYTES = 512 * 2**20


@dataclass
class MonitorReading:
    """One monitor measurement: kNN top-1 (%) per pooling, and the seconds it took."""

    top1: dict[str, float]
    seconds: float


def pooled_features(encoder: ViTEncoder, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled features of whole images under both poolings: ``[N, C, H, W] -> {pool: [N, D]}``.

    Matches :class:`mpp.models.ViTClassifier` at initialisation without modifying ``encoder``: ``avg`` is the mean
    patch token taken before the final norm, through a LayerNorm with unit weight and zero bias (eps 1e-6); ``token``
    is the cls token after the final norm (only when the encoder has one).
    """
    x = encoder.prepend_cls(encoder.embed_patches(imgs))
    for block in encoder.blocks:
        x = block(x)
    patches = x[:, encoder.num_prefix_tokens :]
    out = {"avg": F.layer_norm(patches.mean(dim=1), (x.shape[-1],), eps=1e-6)}
    if encoder.cls_token is not None:
        out["token"] = encoder.norm(x)[:, 0]
    return out


class KnnMonitor:
    """kNN top-1 of the encoder's pooled features on a fixed, labelled subset of the training split.

    Args:
        images: ``[M, C, H, W]`` preprocessed (evaluation transform) images; the first ``num_queries`` are queries.
        labels: ``[M]`` their classes.
        num_queries: how many of the images are queries; the rest is the bank.
        k: neighbours per query.
        temperature: vote temperature.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_queries: int,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 512,
    ) -> None:
        if not 0 < num_queries < len(labels):
            raise ValueError(f"num_queries must be in (0, {len(labels)}), got {num_queries}")
        self.images = images
        self.labels = labels.long()
        self.num_queries = num_queries
        self.num_classes = int(self.labels.max()) + 1
        self.k, self.temperature, self.batch_size = k, temperature, batch_size

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        samples: int,
        query_fraction: float,
        seed: int,
        **settings: float,
    ) -> KnnMonitor | None:
        """Draw the seeded labelled subset of ``dataset`` (items ``(image, label)``, evaluation transform).

        Returns ``None`` when fewer than two classes are labelled (nothing to classify).
        """
        targets = targets_of(dataset)
        labelled = [i for i, t in enumerate(targets) if t >= 0]
        if len({targets[i] for i in labelled}) < 2:
            return None
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(mix_seed(seed, 0x6B6E6E)))
        chosen = [labelled[i] for i in order[: min(samples, len(labelled))].tolist()]
        images = torch.stack([dataset[i][0] for i in chosen])
        if images.element_size() * images.numel() > CACHE_FP32_BYTES:
            images = images.half()  # e.g. 5000 ImageNet crops: 3 GB in float32; the features barely move in fp16
        labels = torch.tensor([targets[i] for i in chosen])
        num_queries = min(max(1, round(len(chosen) * query_fraction)), len(chosen) - 1)
        return cls(images, labels, num_queries, **settings)  # type: ignore[arg-type]

    @property
    def bank_size(self) -> int:
        """Images in the memory bank."""
        return len(self.labels) - self.num_queries

    @torch.no_grad()
    def measure(
        self,
        encoder: ViTEncoder,
        device: torch.device | str = "cpu",
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> MonitorReading:
        """Top-1 kNN accuracy (%) of each pooling; the encoder is put back in the train/eval mode it was in.

        Args:
            encoder: the encoder (or the whole MAE; its decoder is unused).
            device: where the features are computed.
            autocast: a factory of the precision context of the run (``accelerator.autocast``).
        """
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        chunks: dict[str, list[torch.Tensor]] = {}
        try:
            for begin in range(0, len(self.images), self.batch_size):
                batch = self.images[begin : begin + self.batch_size].to(device).float()
                with autocast():
                    for pool, feats in pooled_features(encoder, batch).items():
                        chunks.setdefault(pool, []).append(feats.float().cpu())
        finally:
            encoder.train(was_training)
        q = self.num_queries
        top1 = {}
        for pool, parts in chunks.items():
            feats = torch.cat(parts)
            votes = knn_scores(feats[q:], self.labels[q:], feats[:q], self.num_classes, self.k, self.temperature)
            top1[pool] = 100.0 * (votes.argmax(dim=1) == self.labels[:q]).float().mean().item()
        return MonitorReading(top1, time.perf_counter() - start)
