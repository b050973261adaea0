"""Online kNN monitor: does the encoder learn anything while it pretrains?

A seeded subset of the labelled *training* images (never a test split) is drawn once, cut into a memory bank and
queries, and kept as a preprocessed tensor. Each reading passes it through the encoder, pools the tokens both ways
the evaluation stages do (``token``: cls after the final norm; ``avg``: mean patch token before the final norm, then a
parameter-free LayerNorm, as :class:`mpp.models.ViTClassifier`), and scores weighted cosine kNN
(:func:`mpp.neighbours.knn_scores`, k 20, T 0.07 by default). The reading of the randomly initialised model is taken
once at the start, so every later reading can be compared with what no pretraining gives.

The subset is small (a few thousand images) so that a reading costs seconds, not the minutes a full 60k-image kNN
takes; its absolute value is lower than ``mpp knn``'s full-bank one, but gains over random init carry over.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mpp.data.sampling import mix_seed, targets_of
from mpp.models.vit import ViTEncoder
from mpp.neighbours import knn_scores

CACHE_FP32_BYTES = 512 * 2**20
# Measured (docs/own-images.md, "The monitor's dip"): not an unstable run, so the user should not stop it.
BELOW_RANDOM_NOTE = (
    "  note: below random init. Early in MAE training the pooled features lose the class information a random "
    "network keeps (strong where raw pixels already separate the classes); the loss still falls, and on a "
    "1,437-image digits folder the reading fell 15 points at step 110, was back above random by step 180 and at 98% "
    "by step 600. Judge the run by its end (docs/own-images.md)"
)


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


@dataclass
class KnnMonitor:
    """kNN top-1 of the encoder's pooled features on a fixed, labelled subset of the training split.

    Attributes:
        images: ``[M, C, H, W]`` preprocessed (evaluation transform) images; the first ``num_queries`` are queries.
        labels: ``[M]`` their classes.
        num_queries: how many of the images are queries; the rest is the bank.
        k: neighbours per query.
        temperature: vote temperature.
        batch_size: images per forward pass.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_queries: int
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.num_queries < len(self.labels):
            raise ValueError(f"num_queries must be in (0, {len(self.labels)}), got {self.num_queries}")
        self.labels = self.labels.long()
        self.num_classes = int(self.labels.max()) + 1

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


def readings_cadence(reading_s: float, epoch_s: float, max_share: float) -> int:
    """The smallest epoch interval at which readings of ``reading_s`` stay within ``max_share`` of the time."""
    return max(1, math.ceil(reading_s * (1 - max_share) / (max_share * max(epoch_s, 1e-9)) - 1e-9))


def monitor_record(step: int, epoch: float, reading: MonitorReading, random_top1: dict[str, float]) -> dict[str, Any]:
    """The metrics.jsonl record of a monitor reading: ``knn_<pool>`` and ``knn_<pool>_random`` (top-1 %)."""
    record: dict[str, Any] = {"step": step, "epoch": round(epoch, 4), "stage": "monitor"}
    for pool, top1 in reading.top1.items():
        record[f"knn_{pool}"] = round(top1, 2)
        if pool in random_top1:
            record[f"knn_{pool}_random"] = round(random_top1[pool], 2)
    record["monitor_s"] = round(reading.seconds, 2)
    return record


def monitor_text(reading: MonitorReading, random_top1: dict[str, float]) -> str:
    """``token 74.1% (random 66.6%), avg 75.3% (random 61.6%)``."""
    return ", ".join(
        f"{pool} {top1:.2f}% (random {random_top1.get(pool, float('nan')):.2f}%)" for pool, top1 in reading.top1.items()
    )


def previous_random_reading(metrics_path: Path) -> tuple[dict[str, float], float] | None:
    """The random-init monitor reading a resumed run logged at its start (top-1 per pooling, seconds), if any."""
    if not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("stage") == "monitor" and record.get("step") == 0:
            top1 = {k[4:]: v for k, v in record.items() if k.startswith("knn_") and not k.endswith("_random")}
            return top1, float(record.get("monitor_s", 0.0))
    return None


@dataclass
class MonitorRun:
    """A monitor within one training session: the random-init reference, its schedule, and the time it has cost.

    Attributes:
        monitor: the monitor (``None`` on non-main processes, when disabled or without labels).
        every_epochs: reading cadence; the last epoch is always read. ``None``: set by :meth:`pace` so the readings
            cost at most ``max_share`` of the run (every epoch until then).
        epochs: the run's epochs (a budget may change them, see :meth:`pace`).
        pool: the pooling shown on the progress bar.
        random_top1: the step-0 reading (from the log of a resumed run, else taken by the first reading).
    """

    monitor: KnnMonitor | None
    every_epochs: int | None
    epochs: int
    pool: str
    random_top1: dict[str, float] | None = None
    seconds: float = 0.0
    bar_extra: dict[str, str] = field(default_factory=dict)
    max_share: float = 0.05
    reading_s: float | None = None  # what one reading cost (the first of this session)
    auto: bool = field(default=False, init=False)
    say: Callable[[str], None] = print
    dipped: bool = field(default=False, init=False)  # a reading fell below random init (said once)

    def __post_init__(self) -> None:
        self.auto = self.every_epochs is None

    def due(self, epoch: int) -> bool:
        """Whether a completed ``epoch`` gets a reading."""
        return epoch % (self.every_epochs or 1) == 0 or epoch == self.epochs

    def pace(self, seconds_per_step: float, schedule: Any) -> float:
        """The engine's ``on_pace``: pick the cadence (if automatic); the readings' expected seconds per epoch."""
        self.epochs = schedule.epochs
        if self.monitor is None:
            return 0.0
        reading = self.reading_s if self.reading_s is not None else 0.0
        epoch_s = seconds_per_step * schedule.steps_per_epoch
        if self.auto:
            self.every_epochs = readings_cadence(reading, epoch_s, self.max_share)
            if self.every_epochs > 1:
                self.say(
                    f"  kNN monitor thinned to every {self.every_epochs} epochs: a reading costs {reading:.1f} s, an "
                    f"epoch {epoch_s:.1f} s (readings within {100 * self.max_share:g}% of the run; set "
                    "monitor.every_epochs to choose)"
                )
        return reading / (self.every_epochs or 1)

    def read(self, model: Any, accelerator: Any, step: int, epoch: float, log: Any, say: Callable[[str], None]) -> None:
        """Measure, log to metrics.jsonl/TensorBoard (``log``: an :class:`mpp.train.engine.RunLog`), bar and console."""
        if self.monitor is None:
            return
        reading = self.monitor.measure(model, accelerator.device, accelerator.autocast)
        self.seconds += reading.seconds
        if self.reading_s is None:
            self.reading_s = reading.seconds
        if self.random_top1 is None:
            self.random_top1 = dict(reading.top1)
        log.write(monitor_record(step, epoch, reading, self.random_top1), step)
        self.bar_extra.update(
            knn=f"{reading.top1[self.pool]:.1f}", knn_rand=f"{self.random_top1.get(self.pool, float('nan')):.1f}"
        )
        say(f"  kNN monitor at epoch {epoch:g}: {monitor_text(reading, self.random_top1)} [{reading.seconds:.1f} s]")
        if step > 0 and not self.dipped and all(v < self.random_top1.get(p, -1.0) for p, v in reading.top1.items()):
            self.dipped = True
            say(BELOW_RANDOM_NOTE)
