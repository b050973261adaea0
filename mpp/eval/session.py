"""The evaluation session: what kNN, the probe, fine-tuning, ``evaluate`` and the efficiency sweep open once.

:meth:`Session.open` builds the encoder (``init``: a run, an encoder file, any checkpoint, or ``random``; seeded, so a
random one is the seed's), puts it on the requested grid, resolves its normalisation, makes the run directory and
the accelerator. The session then gives the label-budgeted :class:`Splits`, says things on the main process only,
saves the run's config and writes ``results.json`` / ``results.md``. DINOv2's ``eval/setup.py`` plays this part there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import Dataset, Subset

from mpp.config import ConfigError, StageConfig, to_dict
from mpp.data import build_dataset, default_stats
from mpp.data.holdout import without_validation
from mpp.data.sampling import mix_seed
from mpp.data.transforms import eval_transform
from mpp.eval.encoders import load_init
from mpp.eval.labels import LabelBudgetError, label_subset
from mpp.eval.report import write_results
from mpp.formats.hub import resolve_init
from mpp.models.vit import ViTEncoder
from mpp.runtime import check_output_dir, make_accelerator, write_config
from mpp.train.checkpoint import Checkpoint, check_resumable, resume_state
from mpp.train.lock import RunDirLock
from mpp.train.trackers import flat_hparams, log_picture, make_trackers, parse_trackers, start_trackers

# init: a moved run is the same encoder; trackers, hub_pickles: where curves go and how weights are fetched
RESUME_FREE_KEYS = {"output_dir", "progress", "init", "trackers", "hub_pickles"}


# ------------------------------------------------------------------------------------------------ the session
class Session:
    """One evaluation command's encoder, normalisation, accelerator and run directory.

    Attributes:
        config: the command's config.
        stage: its name (``knn``, ``probe``, ``finetune``, ``eval``, ``efficiency``): the run directory's default.
        encoder: the encoder, on the config's grid.
        meta: what its file records (``variant``, ``mean``, ``std``, ``init``, ...).
        mean: the normalisation used, per channel.
        std: likewise.
        accelerator: the command's accelerator.
        run_dir: where it writes.
    """

    def __init__(
        self,
        config: StageConfig,
        stage: str,
        encoder: ViTEncoder,
        meta: dict[str, Any],
        mean: list[float],
        std: list[float],
        accelerator: Accelerator,
        run_dir: Path,
    ) -> None:
        self.config, self.stage, self.encoder, self.meta = config, stage, encoder, meta
        self.mean, self.std, self.accelerator, self.run_dir = mean, std, accelerator, run_dir
        self.say = accelerator.print
        self._opened_rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        self._lock: RunDirLock | None = None

    @classmethod
    def open(
        cls,
        config: StageConfig,
        stage: str,
        *,
        trainable: bool = False,
        drop_path_rate: float = 0.0,
        track: bool = False,
        run_dir: Path | None = None,
        create_run_dir: bool = True,
    ) -> Session:
        """Open the configured encoder for ``stage``.

        Args:
            config: the command's config.
            stage: the command's name for its default run directory.
            trainable: fine-tuning: a learnable position table resized to the grid (:func:`make_trainable_grid`);
                otherwise the frozen protocols' grid (:func:`move_to_grid`).
            drop_path_rate: stochastic depth of the encoder (fine-tuning; frozen protocols keep 0).
            track: send training curves and pictures to ``config.trackers`` (the stages that train).
            run_dir: where to write; default ``output_dir`` or :func:`default_output_dir`.
            create_run_dir: make it now; the efficiency sweep makes it only once its checks have passed.
        """
        encoder, meta = open_encoder(config, drop_path_rate)
        opened_rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        if trainable:
            make_trainable_grid(encoder, config.img_size, config.patch_size)
        else:
            move_to_grid(encoder, config)
        mean, std = resolve_stats(config, meta, encoder.in_chans)
        run_dir = run_dir or run_dir_of(config, stage)
        if create_run_dir:
            check_output_dir(run_dir)
        trackers = make_trackers(parse_trackers(config.trackers), run_dir) if track else []
        accelerator = make_accelerator(
            config.mixed_precision, config.cpu, log_with=trackers or None, project_dir=str(run_dir)
        )
        session = cls(config, stage, encoder, meta, mean, std, accelerator, run_dir)
        if warning := held_out_warning(config, meta):
            session.say(warning)
        session._opened_rng = opened_rng
        session.reseed()  # making the accelerator and the run directory leaves the heads built next untouched
        if create_run_dir:
            session.lock()
        return session

    def lock(self) -> None:
        """Hold ``RUN/.lock`` for the command's life (:mod:`mpp.train.lock`).

        A second run into the same directory while this one lives stops at once, before writing anything, instead of
        interleaving its files with ours. ``command_main`` lets go of it however the command ends.
        """
        self._lock = RunDirLock(self.run_dir, self.say).acquire()

    def reseed(self) -> None:
        """Put the random generators back where opening the encoder left them (heads built next are the seed's)."""
        py, np_state, torch_state = self._opened_rng
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)

    @property
    def main(self) -> bool:
        """Whether this is the process that writes."""
        return self.accelerator.is_main_process

    def eval_transform(self) -> Any:
        """The deterministic evaluation transform at the encoder's input size."""
        return eval_transform(self.encoder.img_size, self.mean, self.std, crop_pct=self.config.data.crop_pct)

    def splits(self, train_transform: Any = None, config: StageConfig | None = None) -> Splits:
        """The label-budgeted train split (``train_transform``, default the evaluation one) and the test split.

        ``config`` gives another label budget of the same data (the efficiency sweep); default the session's.
        """
        test_tf = self.eval_transform()
        return build_splits(config or self.config, self.encoder, train_transform or test_tf, test_tf)

    def resume(self) -> Checkpoint | None:
        """The checkpoint an interrupted run of this stage continues from (``None``: a fresh start).

        The run continues only with the settings it was started with (``output_dir`` and ``progress`` may differ).
        """
        found = resume_state(self.run_dir, self.say)
        if found is not None:
            check_resumable(self.run_dir, self.config, RESUME_FREE_KEYS, f"mpp {self.stage} --resume")
            self.say(f"  resuming from {found.path} (step {found.trainer_state['step']})")
        return found

    def describe(self, pool: str) -> str:
        """One line: variant, size, grid, pooling."""
        return encoder_description(self.encoder, self.meta, pool)

    def data_line(self, splits: Splits) -> str:
        """``  N train images (budget), M test images, C classes``."""
        return (
            f"  {len(splits.train)} train images ({budget_text(splits.label_info)}), {len(splits.test)} test "
            f"images, {splits.num_classes} classes"
        )

    def save_config(
        self, splits: Splits, trackers: bool = False, run_dir: Path | None = None, config: Any = None
    ) -> None:
        """config.yaml (resolved config, provenance, normalisation, label budget) on the main process.

        With ``trackers`` the configured trackers start too (a session opened with ``track``). ``run_dir`` /
        ``config``: another budget's (the efficiency sweep).
        """
        if self.main:
            where = (run_dir or self.run_dir) / "config.yaml"
            write_config(where, to_dict(config or self.config), mean=self.mean, std=self.std, **splits.label_info)
            if trackers:
                start_trackers(self.accelerator, self.run_dir, flat_hparams(to_dict(config or self.config)))

    def write_results(
        self, splits: Splits, pool: str, protocols: dict[str, Any], run_dir: Path | None = None, **extra: Any
    ) -> Path | None:
        """results.json / results.md / confusion pictures on the main process; the results.json path there."""
        if not self.main:
            return None
        results = results_header(self.config, self.encoder, self.meta, pool, splits)
        results["protocols"] = protocols
        results.update(extra)
        where = run_dir or self.run_dir
        write_results(where, results, splits.classes)
        for name in protocols:  # the confusion matrices, to the trackers that take pictures
            if (picture := where / f"confusion_{name}.png").is_file():
                log_picture(self.accelerator, f"{self.stage}/confusion_{name}", picture)
        return where / "results.json"

    def fresh_encoder(self, drop_path_rate: float) -> ViTEncoder:
        """A new copy of the encoder as it was opened, for fine-tuning (drop path; learnable, resized position table).

        Seeded like :meth:`open`, so a fine-tune inside ``mpp evaluate`` starts exactly as ``mpp finetune`` does.
        """
        encoder, _ = open_encoder(self.config, drop_path_rate)
        make_trainable_grid(encoder, self.config.img_size, self.config.patch_size)
        return encoder

    def frozen_encoder(self) -> ViTEncoder:
        """A new copy of the encoder as it was opened, on the frozen protocols' grid.

        For a second readout of the same weights: an average-pooling classifier drops the encoder's final norm in
        place (as the official code does), which a readout of the normed tokens needs.
        """
        encoder, _ = open_encoder(self.config)
        move_to_grid(encoder, self.config)
        return encoder.eval()

    def finish(self) -> None:
        """Wait for every process, close the trackers and let go of the run directory."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self._lock is not None:
            self._lock.release()


def held_out_warning(config: StageConfig, meta: dict[str, Any]) -> str | None:
    """A note when choices are to be made on validation images the encoder was pretrained on (``None``: fine).

    Only mpp's own encoders say what they were pretrained on (``source``, ``val_size``, ``val_seed``).
    """
    d = config.data
    if not d.val_size or meta.get("source") != d.source:
        return None
    if (meta.get("val_size"), meta.get("val_seed", 0)) == (d.val_size, d.val_seed):
        return None
    held = f"data.val_size={meta.get('val_size')}, data.val_seed={meta.get('val_seed', 0)}"
    return (
        f"  note: the encoder was pretrained with {held}, so some of these {d.val_size} validation images were "
        "among its pretraining images; pretrain with the same data.val_size and data.val_seed for honest choices"
    )


# ------------------------------------------------------------------------------------------------ the encoder
def open_encoder(config: StageConfig, drop_path_rate: float = 0.0) -> tuple[ViTEncoder, dict[str, Any]]:
    """The configured encoder (``init``, ``model``) with ``drop_path_rate``, and its metadata, on its stored grid."""
    # Seeded first: a random-init encoder and the heads built after it are the same in every run with this seed.
    set_seed(config.seed)
    overrides = {"stem": config.stem} if config.init == "random" and config.stem else {}
    init = resolve_init(config.init, config.hub_pickles)  # hf://owner/name: fetched into the Hub's cache
    encoder, meta = load_init(init, config.model, drop_path_rate=drop_path_rate, **overrides)
    return encoder, {**meta, "init": config.init}


def move_to_grid(encoder: ViTEncoder, config: StageConfig) -> None:
    """Apply ``config.img_size`` / ``config.patch_size`` to a frozen encoder (no-op when unset or unchanged).

    The encoder keeps its kind of position table: a fixed sin-cos table is recomputed for the new grid, a learned one
    interpolated (:meth:`ViTEncoder.set_grid`).
    """
    img_size = config.img_size or encoder.img_size[0]
    patch = config.patch_size or encoder.patch_size
    if (img_size, img_size) != tuple(encoder.img_size) or patch != encoder.patch_size:
        encoder.set_grid(img_size, patch)


def make_trainable_grid(encoder: ViTEncoder, img_size: int | None, patch_size: int | None) -> None:
    """Make the position table learnable (initialised from the current one) and resize it to a new grid if asked.

    The resize is the 2D bicubic interpolation of :func:`mpp.pos_embed.resize_pos_embed` (the cls row kept), not a
    recomputed sin-cos table: the pretrained table is the starting point, as in the official fine-tuning.
    """
    encoder.pos_embed_type = "learned"
    encoder.encoder_config["pos_embed"] = "learned"
    encoder.pos_embed.requires_grad_(True)
    size = img_size or encoder.img_size[0]
    patch = patch_size or encoder.patch_size
    if (size, size) != tuple(encoder.img_size) or patch != encoder.patch_size:
        encoder.set_grid(size, patch)


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
    """Train (already cut to the label budget), validation and test datasets of a stage.

    Attributes:
        train: the labelled training images the stage may use.
        test: the test images (all of them unless ``data.test_limit``).
        classes: class names (``class_<i>`` when the source has none).
        label_info: the budget and the resulting sizes, for results.json.
        val: the validation images held out of the training split (``data.val_size``; evaluation transform), on
            which choices are made; ``None`` without ``data.val_size``.
    """

    train: Dataset
    test: Dataset
    classes: list[str]
    label_info: dict[str, Any] = field(default_factory=dict)
    val: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def build_splits(config: StageConfig, encoder: ViTEncoder, train_transform: Any, test_transform: Any) -> Splits:
    """The stage's train split (label budget applied), validation split (``data.val_size``) and test split.

    The validation images are taken out of the training split before the label budget is drawn, so they are never
    labelled-training images (nor, with the same ``data.val_size`` in pretraining, pretraining images).

    Raises:
        LabelBudgetError: the budget cannot be met (one line naming the class).
        ValueError: no labels in the training split.
    """
    d = config.data
    common = {
        "path": d.path,
        "in_chans": encoder.in_chans,
        "image_column": d.image_column,
        "label_column": d.label_column,
        "cache_dir": d.cache_dir,
        "synthetic_size": d.synthetic_size,
        "synthetic_img_size": encoder.img_size[0],
        "synthetic_classes": d.synthetic_classes,
        "seed": config.seed,
    }
    train = build_dataset(d.source, d.train_split, train_transform, **common)
    test = build_dataset(d.source, d.test_split, test_transform, **common)
    targets = list(train.targets)
    labelled = [t for t in targets if t >= 0]
    if not labelled:
        raise LabelBudgetError(f"{d.source} split {d.train_split!r} has no labels; evaluation needs labelled images")
    num_classes = max(max(labelled), max((t for t in test.targets if t >= 0), default=0)) + 1
    classes = list(train.classes) if train.classes else [f"class_{i}" for i in range(num_classes)]
    _, val_keep = without_validation(targets, d.val_size, d.val_seed)
    if val_keep:
        held = set(val_keep)
        targets = [-1 if i in held else t for i, t in enumerate(targets)]
        labelled = [t for t in targets if t >= 0]
    label_seed = config.seed if config.label_seed is None else config.label_seed
    keep = label_subset(
        targets,
        labels_per_class=config.labels_per_class,
        fraction=config.label_fraction,
        seed=label_seed,
        class_names=classes,
    )
    test_keep = [i for i, t in enumerate(test.targets) if t >= 0]
    if d.test_limit is not None and d.test_limit < len(test_keep):
        order = torch.randperm(len(test_keep), generator=torch.Generator().manual_seed(mix_seed(config.seed, 7)))
        test_keep = sorted(test_keep[i] for i in order[: d.test_limit].tolist())
    info = {
        "labels_per_class": config.labels_per_class,
        "label_fraction": config.label_fraction,
        "label_seed": label_seed,
        "train_available": len(labelled),
        "train_used": len(keep),
        "test_size": len(test_keep),
        "test_limited": d.test_limit is not None,
    }
    val = None
    if val_keep:
        info.update(val_size=len(val_keep), val_seed=d.val_seed)
        same = train_transform is test_transform
        val = Subset(train if same else build_dataset(d.source, d.train_split, test_transform, **common), val_keep)
    return Splits(Subset(train, keep), Subset(test, test_keep), classes, info, val)


# ------------------------------------------------------------------------------------------------ where and what
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
    """The stage's output directory: ``output_dir``, else :func:`default_output_dir`."""
    return Path(config.output_dir) if config.output_dir else default_output_dir(config, stage)


def encoder_description(encoder: Any, meta: dict[str, Any], pool: str) -> str:
    """One line: variant, size, grid, pooling."""
    variant = meta.get("variant") or "ViT"
    h, w = encoder.img_size
    return (
        f"{variant} ({encoder.embed_dim}-d, {len(encoder.blocks)} blocks, {h}x{w} px, patch "
        f"{encoder.patch_size}, {pool} pooling)"
    )


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
