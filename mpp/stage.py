"""Pieces the evaluation stages (``knn``, ``probe``, ``finetune``, ``evaluate``) share.

Command line, encoder, data with a label budget, accelerator, run directory, batched inference, results header. Each
stage's ``main`` stays a short script over these pieces, like ``mpp pretrain``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mpp.checkpoint import Checkpoint
from mpp.config import ConfigError
from mpp.data import build_dataset, default_stats
from mpp.data.skips import start_skip_log
from mpp.data.transforms import eval_transform
from mpp.encoders import load_init
from mpp.engine import (
    Checkpointer,
    FitHooks,
    RunLog,
    Schedule,
    TrainState,
    check_resumable,
    fit,
    restore,
    restore_scaler,
    resume_state,
)
from mpp.eval_config import StageConfig, build_eval_config
from mpp.labels import LabelBudgetError, label_subset
from mpp.models.vit import ViTEncoder
from mpp.runinfo import settings_to_resume, write_config
from mpp.runtime import check_output_dir, make_accelerator
from mpp.sampling import EpochLoader, mix_seed, split_key


# ------------------------------------------------------------------------------------------------ command line
def parse_stage_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """``--recipe``, ``--print-config``, dotted ``key=value`` overrides, and at most one bare ``INIT`` argument."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Settings: defaults <- --recipe YAML <- key=value overrides (dotted keys). "
        "INIT (or init=...) is a pretraining run dir, an encoder.safetensors, a checkpoint, or 'random'.",
    )
    parser.add_argument("--recipe", help="YAML recipe stating what differs from the defaults")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the stopped run in RUN_DIR (its saved settings)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("args", nargs="*", metavar="INIT | key=value", help="the encoder, and dotted overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --recipe
    args.overrides = [a for a in args.args if "=" in a]
    bare = [a for a in args.args if "=" not in a]
    if len(bare) > 1:
        parser.error(f"at most one INIT argument, got {bare}; overrides look like key=value")
    args.init = bare[0] if bare else None
    return args


def resolve_stage_config(cls: type, args: argparse.Namespace) -> Any:
    """The stage config from the parsed command line (``--resume``: the saved settings of that run)."""
    base = None
    if getattr(args, "resume", None):
        base = settings_to_resume(args.resume, args.recipe)
        base.pop("_run", None)
    return build_eval_config(cls, args.recipe, args.overrides, init=args.init, base=base)


def stage_main(prog: str, cls: type, description: str, run: Callable[[Any], Any], argv: list[str] | None) -> int:
    """Parse, build the config, run; bad input is a one-line error (exit 2), a diverging loss exit 3."""
    from mpp.commands import run_command

    args = parse_stage_args(prog, description, argv)
    return run_command(prog, lambda: resolve_stage_config(cls, args), run, args.print_config)


# ------------------------------------------------------------------------------------------------ encoder
def stage_encoder(config: StageConfig, drop_path_rate: float = 0.0) -> tuple[ViTEncoder, dict[str, Any]]:
    """The configured encoder (``init``, ``model``) with ``drop_path_rate``, and its metadata.

    The grid is left as stored: frozen protocols call :func:`move_to_grid`, fine-tuning
    :func:`mpp.finetune.make_trainable_grid`.
    """
    # Seeded first: a random-init encoder and the heads built after it are the same in every run with this seed.
    set_seed(config.seed)
    encoder, meta = load_init(config.init, config.model, drop_path_rate=drop_path_rate)
    return encoder, meta


def move_to_grid(encoder: ViTEncoder, config: StageConfig) -> None:
    """Apply ``config.img_size`` / ``config.patch_size`` to a frozen encoder (no-op when unset or unchanged).

    The encoder keeps its kind of position table: a fixed sin-cos table is recomputed for the new grid, a learned one
    interpolated (:meth:`ViTEncoder.set_grid`).
    """
    img_size = config.img_size or encoder.img_size[0]
    patch = config.patch_size or encoder.patch_size
    if (img_size, img_size) != tuple(encoder.img_size) or patch != encoder.patch_size:
        encoder.set_grid(img_size, patch)


def resolve_stats(config: StageConfig, meta: dict[str, Any], in_chans: int) -> tuple[list[float], list[float]]:
    """Normalisation: the config's, else what the encoder was pretrained with, else the source's defaults."""
    if config.data.mean is not None and config.data.std is not None:
        mean, std = list(config.data.mean), list(config.data.std)
    elif meta.get("mean") is not None and meta.get("std") is not None:
        mean, std = list(meta["mean"]), list(meta["std"])
    else:
        m, s = default_stats(config.data.source, in_chans)
        mean, std = list(m), list(s)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(
            f"data.mean/data.std have {len(mean)}/{len(std)} values but the encoder takes {in_chans} channels"
        )
    return mean, std


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Splits:
    """Train (already cut to the label budget) and test datasets of a stage.

    Attributes:
        train: the labelled training images the stage may use.
        test: the test images (all of them unless ``data.test_limit``).
        classes: class names (``class_<i>`` when the source has none).
        label_info: the budget and the resulting sizes, for results.json.
    """

    train: Dataset
    test: Dataset
    classes: list[str]
    label_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def targets_of(dataset: Dataset) -> list[int]:
    """Labels of a dataset or a :class:`~torch.utils.data.Subset` of one, read without decoding images."""
    if isinstance(dataset, Subset):
        base = targets_of(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.targets)  # type: ignore[attr-defined]


def build_splits(config: StageConfig, encoder: ViTEncoder, train_transform: Any, test_transform: Any) -> Splits:
    """The stage's train split (label budget applied) and test split.

    Raises:
        LabelBudgetError: the budget cannot be met (one line naming the class).
        ValueError: no labels in the training split.
    """
    d = config.data
    common = {
        "path": d.path, "in_chans": encoder.in_chans, "image_column": d.image_column, "label_column": d.label_column,
        "cache_dir": d.cache_dir, "synthetic_size": d.synthetic_size, "synthetic_img_size": encoder.img_size[0],
        "synthetic_classes": d.synthetic_classes, "seed": config.seed,
    }  # fmt: skip
    train = build_dataset(d.source, d.train_split, train_transform, **common)
    test = build_dataset(d.source, d.test_split, test_transform, **common)
    targets = list(train.targets)
    labelled = [t for t in targets if t >= 0]
    if not labelled:
        raise LabelBudgetError(f"{d.source} split {d.train_split!r} has no labels; evaluation needs labelled images")
    num_classes = max(max(labelled), max((t for t in test.targets if t >= 0), default=0)) + 1
    classes = list(train.classes) if train.classes else [f"class_{i}" for i in range(num_classes)]
    label_seed = config.seed if config.label_seed is None else config.label_seed
    keep = label_subset(targets, labels_per_class=config.labels_per_class, fraction=config.label_fraction,
                        seed=label_seed, class_names=classes)  # fmt: skip
    test_keep = [i for i, t in enumerate(test.targets) if t >= 0]
    if d.test_limit is not None and d.test_limit < len(test_keep):
        order = torch.randperm(len(test_keep), generator=torch.Generator().manual_seed(mix_seed(config.seed, 7)))
        test_keep = sorted(test_keep[i] for i in order[: d.test_limit].tolist())
    info = {
        "labels_per_class": config.labels_per_class, "label_fraction": config.label_fraction,
        "label_seed": label_seed, "train_available": len(labelled), "train_used": len(keep),
        "test_size": len(test_keep), "test_limited": d.test_limit is not None,
    }  # fmt: skip
    return Splits(Subset(train, keep), Subset(test, test_keep), classes, info)


def eval_tf(config: StageConfig, encoder: ViTEncoder, mean: list[float], std: list[float]) -> Any:
    """The deterministic evaluation transform at the encoder's input size."""
    return eval_transform(encoder.img_size, mean, std, crop_pct=config.data.crop_pct)


class SeededItems(Dataset):
    """``base``'s items with their augmentation randomness seeded from ``(seed, epoch, index)``.

    torch's, Python's and numpy's generators (timm's RandAugment and random erasing use the latter two) are seeded per
    item and restored after, so an image's augmentation does not depend on the worker or process that loads it.
    Keys are ``(epoch, index)`` pairs (:class:`mpp.sampling.EpochSampler`) or bare indices into :attr:`epoch`.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = split_key(key, self.epoch)
        sample_seed = mix_seed(self.seed, epoch, index)
        state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)  # timm's RandAugment picks its ops with numpy's global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.base[index]
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def loader_workers(num_workers: int, images_per_epoch: int) -> int:
    """Loader workers for an epoch of ``images_per_epoch`` images: none for small (few-label) epochs.

    Starting worker processes costs about a second, far more than augmenting a few hundred images in the main
    process, and a 100-image epoch is one step (the few-label stages stretch such epochs to hundreds).
    """
    return num_workers if images_per_epoch >= 4096 else 0


# ------------------------------------------------------------------------------------------------ running
def stage_accelerator(config: StageConfig, run_dir: Path | None = None) -> Accelerator:
    """The stage's accelerator (:func:`mpp.runtime.make_accelerator`); TensorBoard in ``run_dir`` if given."""
    if run_dir is None:
        return make_accelerator(config.mixed_precision, config.cpu)
    return make_accelerator(config.mixed_precision, config.cpu, log_with="tensorboard", project_dir=str(run_dir))


def stage_checkpoint(run_dir: Path, config: StageConfig, stage: str, say: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint an interrupted run of this stage in ``run_dir`` continues from (``None``: a fresh start).

    The run continues only with the settings it was started with (``output_dir`` and ``progress`` may differ).
    """
    found = resume_state(run_dir, say)
    if found is not None:
        check_resumable(run_dir, config, RESUME_FREE_KEYS, f"mpp {stage} --resume")
        say(f"  resuming from {found.path} (step {found.trainer_state['step']})")
    return found


RESUME_FREE_KEYS = {"output_dir", "progress", "init"}  # init: a moved pretraining run is the same encoder


def train_stage(
    config: StageConfig,
    stage: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    schedule: Schedule,
    train: Dataset,
    accelerator: Accelerator,
    run_dir: Path | None,
    found: Checkpoint | None,
    *,
    log_every: int = 10,
    clip_grad: float | None = None,
    on_prepared: Callable[[nn.Module, Checkpoint | None], None] | None = None,
    hooks: FitHooks | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    say: Callable[[str], None] = print,
) -> nn.Module:
    """Train a labelled-image stage (full probe, fine-tuning) with the engine; the trained, unwrapped model.

    Restores ``found`` first, logs to ``run_dir``/metrics.jsonl and checkpoints there about ten times per run (when
    ``run_dir`` is given), so the stage resumes exactly after a crash like pretraining does.
    """
    state = restore(found, model, optimizer) if found is not None else TrainState()
    prepared, optimizer = accelerator.prepare(model, optimizer)
    restore_scaler(found, accelerator)
    raw = accelerator.unwrap_model(prepared)
    if on_prepared is not None:
        on_prepared(raw, found)
    workers = loader_workers(config.data.num_workers,
                             schedule.micro_batches_per_epoch * schedule.batch_size * schedule.world)  # fmt: skip

    loader_for = EpochLoader(train, schedule.batch_size, rank=accelerator.process_index, world_size=schedule.world,
                             seed=config.seed, num_workers=workers, pin_memory=accelerator.device.type == "cuda",
                             persistent_workers=config.data.persistent_workers,
                             prefetch_factor=config.data.prefetch_factor)  # fmt: skip

    log = RunLog(accelerator, run_dir, stage)
    checkpointer = None
    if run_dir is not None and (skipped := start_skip_log(train, run_dir, write=accelerator.is_main_process)):
        say(skipped)
    if run_dir is not None:
        checkpointer = Checkpointer(accelerator, run_dir, every_epochs=max(1, schedule.epochs // 10),
                                    extra_state=extra_state)  # fmt: skip
    try:
        fit(accelerator, prepared, optimizer, loss_fn, schedule, state, loader_for, seed=config.seed, log=log,
            log_every=log_every, clip_grad=clip_grad, checkpointer=checkpointer, hooks=hooks,
            progress=config.progress, say=say)  # fmt: skip
    finally:
        log.close()
    return raw


def default_output_dir(config: StageConfig, stage: str) -> Path:
    """Where a stage writes when ``output_dir`` is unset, named after the encoder, the label budget and the seeds.

    ``RUN/<stage>[_<budget>][_seed<n>]`` for a pretraining run directory (results live beside the encoder),
    ``runs/<stage>/<file stem>[...]`` for a weights file and ``runs/<stage>/random_<model>[...]`` for ``init=random``.
    """
    suffix = ""
    if config.labels_per_class:
        suffix = f"_{config.labels_per_class}_per_class"
    elif config.label_fraction:
        suffix = f"_{100 * config.label_fraction:g}pct"
    label_seed = config.seed if config.label_seed is None else config.label_seed
    if config.seed or label_seed != config.seed:
        suffix += f"_seed{config.seed}" + (f"_labels{label_seed}" if label_seed != config.seed else "")
    init = Path(str(config.init))
    if config.init != "random" and init.is_dir():
        return init / f"{stage}{suffix}"
    name = f"random_{config.model}" if config.init == "random" else init.stem
    return Path("runs") / stage / f"{name}{suffix}"


def run_dir_of(config: StageConfig, stage: str) -> Path:
    """The stage's output directory (``output_dir``, else :func:`default_output_dir`), created."""
    return check_output_dir(Path(config.output_dir) if config.output_dir else default_output_dir(config, stage))


def save_run_config(run_dir: Path, config: StageConfig, **derived: Any) -> None:
    """config.yaml: the resolved config, provenance, derived numbers."""
    from mpp.config import to_dict

    write_config(run_dir / "config.yaml", to_dict(config), **derived)


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
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda")  # fmt: skip
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


# ------------------------------------------------------------------------------------------------ reporting
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
    label budget may change between calls (the data-efficiency sweep of :mod:`mpp.efficiency`).
    """

    def __init__(self) -> None:
        self._feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows: dict[int, int] = {}  # train dataset index -> row of the cached train features
        self._test: list[int] = []

    def features(
        self, classifier: Any, splits: Splits, accelerator: Any, batch_size: int, num_workers: int, progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_x, train_y, test_x, test_y)`` of ``splits``, like :func:`extract_split_features`."""
        train, test = splits.train, splits.test
        if not isinstance(train, Subset) or not isinstance(test, Subset):
            raise TypeError("FeatureCache needs the Subset splits of build_splits")
        if self._feats is None:
            labelled = [i for i, t in enumerate(targets_of(train.dataset)) if t >= 0]
            everything = Splits(Subset(train.dataset, labelled), test, splits.classes)
            # DataLoaders draw a seed from torch's global generator: forked, so every budget then starts its probe from
            # the same random state, whether it extracted the features or found them here.
            with torch.random.fork_rng(devices=[]):
                self._feats = extract_split_features(classifier, everything, accelerator, batch_size, num_workers,
                                                     progress)  # fmt: skip
            self._rows = {index: row for row, index in enumerate(labelled)}
            self._test = list(test.indices)
        elif list(test.indices) != self._test:
            raise RuntimeError("FeatureCache: the test split changed; a cache serves one encoder and one data config")
        rows = torch.tensor([self._rows[i] for i in train.indices], dtype=torch.long)
        train_x, train_y, test_x, test_y = self._feats
        return train_x[rows], train_y[rows], test_x, test_y


def encoder_description(encoder: Any, meta: dict[str, Any], pool: str) -> str:
    """One line: variant, size, grid, pooling."""
    variant = meta.get("variant") or "ViT"
    h, w = encoder.img_size
    return (f"{variant} ({encoder.embed_dim}-d, {len(encoder.blocks)} blocks, {h}x{w} px, patch "
            f"{encoder.patch_size}, {pool} pooling)")  # fmt: skip


def budget_text(info: dict[str, Any]) -> str:
    """``10 labels per class``, ``1% of labels`` or ``all labels``."""
    if info.get("labels_per_class"):
        return f"{info['labels_per_class']} labels per class"
    if info.get("label_fraction"):
        return f"{100 * info['label_fraction']:g}% of labels"
    return "all labels"


def results_header(config: Any, encoder: Any, meta: dict[str, Any], pool: str, splits: Splits) -> dict[str, Any]:
    """The parts of results.json every stage shares: what was evaluated, on what, with which labels."""
    return {
        "init": config.init,
        "variant": meta.get("variant"),
        "encoder_desc": encoder_description(encoder, meta, pool),
        "encoder": dict(encoder.encoder_config),
        "global_pool": pool,
        "data": {
            "source": config.data.source,
            "train_split": config.data.train_split,
            "test_split": config.data.test_split,
        },
        "labels": splits.label_info,
        "classes": splits.classes,
        "seed": config.seed,
    }
