"""The pretraining config (``mpp pretrain``): model, data, optimiser, monitor, and the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mpp.config.core import (
    ScheduleConfig,
    SourceConfig,
    check,
    check_precision,
    check_schedule,
    check_source,
)


@dataclass
class ModelConfig:
    """Which MAE to build. ``name`` is a registry variant; other fields override it when set."""

    name: str = "mae_vit_tiny_patch4"
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    mask_type: str = "random"
    drop_path_rate: float = 0.0
    global_pool: str = "token"
    stem: str = "linear"  # linear: the paper's patch projection; conv: per-patch convolutions (mpp.models.stem)
    # The pixel decoder (pretraining only; None: the variant's). The MAE paper's Table 1 ablates depth and width.
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None


@dataclass
class DataConfig(SourceConfig):
    """Pretraining images: the source, the split, and their augmentation."""

    split: str = "train"
    crop_scale_min: float = 0.2
    hflip: bool = True
    limit: int | None = None
    # Decode every image once and augment whole batches in the training process (mpp.data.memory); None: on for the
    # sources that are arrays in memory anyway (fashion-mnist, synthetic), off for files.
    in_memory: bool | None = None
    # source=hf only: read the split as a stream (mpp.data.stream) instead of downloading/opening it whole.
    streaming: bool = False
    stream_length: int | None = None  # images in the split, when the dataset's metadata does not say
    shuffle_buffer: int = 10_000
    stream_threads: int = 4  # image decoding threads


@dataclass
class OptimConfig(ScheduleConfig):
    """Pretraining optimiser and schedule, as the paper: AdamW (0.9, 0.95), ``lr = blr * effective_batch / 256``."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    fused: bool | None = None  # fused AdamW kernel; None: on with CUDA
    clip_grad: float | None = None


@dataclass
class MonitorConfig:
    """The online kNN monitor (:mod:`mpp.train.monitor`): kNN top-1 on a labelled subset of the *training* split.

    ``samples`` images are drawn once (seeded); ``query_fraction`` of them are queries, the rest the memory bank. A
    reading is taken at the start (random init) and every ``every_epochs`` epochs (None: as often as keeps the
    readings within ``max_share`` of the run, from the first reading's cost and the first steps' pace); it is skipped
    with a note when the data has no labels.
    """

    enabled: bool = True
    every_epochs: int | None = None
    max_share: float = 0.05
    samples: int = 5000
    query_fraction: float = 0.2
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 500


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    derives_settings: ClassVar[bool] = True  # without a recipe, mpp.config.rules may size the run from the data

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # Settings from the data (mpp.config.rules) when there is no recipe: None: when data.path is given; true: always
    auto: bool | None = None
    output_dir: str = "runs/pretrain"
    seed: int = 0
    mixed_precision: str = "auto"
    compile: bool | None = None  # torch.compile the model; None: on with CUDA, off on CPUs (measured slower there)
    compile_backend: str = "inductor"
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (mpp.train.fsdp)
    cpu: bool = False
    log_every: int = 10
    checkpoint_every_steps: int | None = None
    # Epoch-end checkpoints and reconstruction pictures; None: about 20 per run (every epoch up to 20 epochs), so a
    # small dataset's hundreds of short epochs do not spend the run writing them.
    checkpoint_every_epochs: int | None = None
    keep_checkpoints: int = 2
    resume_any_world: bool = False  # resume on another process count than the run was trained on (a different run)
    stop_at_step: int | None = None
    viz_samples: int = 8
    progress: bool = True
    # Experiment trackers, any of accelerate's (tensorboard, wandb, mlflow, aim, ...); none: metrics.jsonl only
    trackers: list[str] | str = field(default_factory=lambda: ["tensorboard"])

    def check(self) -> None:
        """Raise :class:`ConfigError` on the first impossible value."""
        check_pretrain(self)


def validate_model(model: ModelConfig, prefix: str = "model.") -> None:
    """Impossible model values: unknown variant, ratio outside (0, 1), image not divisible by patch, ..."""
    from mpp.masking import MASK_TYPES
    from mpp.models.registry import MODEL_CONFIGS, model_config
    from mpp.models.stem import STEMS

    check(
        model.name in MODEL_CONFIGS,
        f"{prefix}name",
        model.name,
        f"unknown model; valid: {', '.join(sorted(MODEL_CONFIGS))}",
    )
    check(0.0 < model.mask_ratio < 1.0, f"{prefix}mask_ratio", model.mask_ratio, "must be strictly between 0 and 1")
    check(model.stem in STEMS, f"{prefix}stem", model.stem, f"must be one of {', '.join(STEMS)}")
    check(model.mask_type in MASK_TYPES, f"{prefix}mask_type", model.mask_type, f"must be one of {MASK_TYPES}")
    check(model.global_pool in ("token", "avg"), f"{prefix}global_pool", model.global_pool, "must be token or avg")
    check(0.0 <= model.drop_path_rate < 1.0, f"{prefix}drop_path_rate", model.drop_path_rate, "must be in [0, 1)")
    resolved = model_config(model.name, **model_overrides(model))
    img, patch = resolved.get("img_size", 224), resolved["patch_size"]
    check(patch > 0, f"{prefix}patch_size", patch, "must be positive")
    check(
        img > 0 and img % patch == 0, f"{prefix}img_size", img, f"must be a positive multiple of the patch size {patch}"
    )
    from mpp.masking import num_kept

    patches = (img // patch) ** 2
    check(
        num_kept(patches, model.mask_ratio) >= 1,
        f"{prefix}mask_ratio",
        model.mask_ratio,
        f"leaves no visible patch of the {patches}; lower it",
    )
    for key in ("in_chans", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        value = getattr(model, key)
        check(value is None or value > 0, f"{prefix}{key}", value, "must be positive")
    check(
        resolved["decoder_embed_dim"] % resolved["decoder_num_heads"] == 0,
        f"{prefix}decoder_embed_dim",
        resolved["decoder_embed_dim"],
        f"must be a multiple of decoder_num_heads {resolved['decoder_num_heads']}",
    )


def model_overrides(model: ModelConfig) -> dict[str, Any]:
    """Constructor overrides of the registry variant given by a :class:`ModelConfig`."""
    out: dict[str, Any] = {
        "norm_pix_loss": model.norm_pix_loss,
        "mask_ratio": model.mask_ratio,
        "mask_type": model.mask_type,
        "drop_path_rate": model.drop_path_rate,
        "global_pool": model.global_pool,
    }
    for key in ("img_size", "patch_size", "in_chans", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(model, key) is not None:
            out[key] = getattr(model, key)
    if model.stem != "linear":
        out["stem"] = model.stem
    return out


def check_pretrain(config: PretrainConfig) -> None:
    """Every impossible value of a pretraining config."""
    from mpp.train.trackers import check_trackers, parse_trackers

    check_trackers(parse_trackers(config.trackers))
    validate_model(config.model)
    d = config.data
    check_source(d)
    check(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", d.crop_scale_min, "must be in (0, 1]")
    check(d.limit is None or d.limit > 0, "data.limit", d.limit, "must be positive")
    check(not (d.streaming and d.val_size), "data.val_size", d.val_size, "is not supported with streaming")
    if d.streaming:
        check(d.source == "hf", "data.streaming", d.streaming, f"needs data.source=hf, not {d.source}")
        check(not d.in_memory, "data.in_memory", d.in_memory, "cannot hold a stream; leave it unset with streaming")
        check(d.limit is None, "data.limit", d.limit, "is not supported with streaming (use data.stream_length)")
        check(d.stream_length is None or d.stream_length > 0, "data.stream_length", d.stream_length, "must be positive")
        check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
        check(d.stream_threads >= 1, "data.stream_threads", d.stream_threads, "must be >= 1")
    check_schedule(config.optim, "optim.")
    m = config.monitor
    check(m.every_epochs is None or m.every_epochs > 0, "monitor.every_epochs", m.every_epochs, "must be positive")
    check(0 < m.max_share < 1, "monitor.max_share", m.max_share, "must be in (0, 1)")
    check(m.samples >= 2, "monitor.samples", m.samples, "must be at least 2 (a bank and a query)")
    check(0 < m.query_fraction < 1, "monitor.query_fraction", m.query_fraction, "must be strictly between 0 and 1")
    check(m.k > 0, "monitor.k", m.k, "must be positive")
    check(m.temperature > 0, "monitor.temperature", m.temperature, "must be positive")
    check(m.batch_size > 0, "monitor.batch_size", m.batch_size, "must be positive")
    check_precision(config.mixed_precision)
    check(config.log_every > 0, "log_every", config.log_every, "must be positive")
    check(config.viz_samples >= 0, "viz_samples", config.viz_samples, "must be >= 0 (0: no pictures)")
    steps = config.checkpoint_every_steps
    check(steps is None or steps > 0, "checkpoint_every_steps", steps, "must be positive (or null: epoch ends only)")
    check(0 <= config.seed < 2**32, "seed", config.seed, "must be an integer in [0, 2**32)")
    check(d.synthetic_classes > 0, "data.synthetic_classes", d.synthetic_classes, "must be positive")
    check(d.synthetic_size > 0, "data.synthetic_size", d.synthetic_size, "must be positive")
    check(config.keep_checkpoints > 0, "keep_checkpoints", config.keep_checkpoints, "must be positive")
    every = config.checkpoint_every_epochs
    check(every is None or every > 0, "checkpoint_every_epochs", every, "must be positive")
    check(
        config.stop_at_step is None or config.stop_at_step > 0, "stop_at_step", config.stop_at_step, "must be positive"
    )
