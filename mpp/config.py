"""Typed configs: defaults in dataclasses, recipes in YAML that state only what differs, dotted overrides.

Loading order is defaults -> recipe -> ``key=value`` overrides. Unknown keys, wrong types and impossible values are
one-line :class:`ConfigError` s naming the key, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mpp.data import SOURCES


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the value."""


PRECISIONS = ("auto", "fp32", "no", "bf16", "fp16")  # fp32 == no (accelerate's spelling); auto: bf16 on CUDA only


@dataclass
class SourceConfig:
    """Where images come from: what pretraining and every evaluation stage share in their ``data`` section."""

    source: str = "fashion-mnist"
    path: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    cache_dir: str | None = None
    mean: list[float] | None = None  # None: the source's defaults (evaluation: the encoder's recorded statistics)
    std: list[float] | None = None
    num_workers: int = 2
    persistent_workers: bool = True  # loader workers start once per run, not once per epoch
    prefetch_factor: int = 2  # batches each worker prepares ahead
    synthetic_size: int = 512
    synthetic_classes: int = 4


@dataclass
class ScheduleConfig:
    """What every training schedule has (``optim``, ``probe``, ``finetune``); each section sets its own defaults.

    ``lr = blr * effective_batch / 256`` unless ``lr`` is set; linear warmup then half-cycle cosine to ``min_lr``;
    ``min_steps`` stretches the epochs of a small (few-label) training set until it gets that many optimiser steps.
    """

    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 64
    accum_steps: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    min_steps: int = 0
    weight_decay: float = 0.05


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
    """The online kNN monitor (:mod:`mpp.monitor`): kNN top-1 on a labelled subset of the *training* split.

    ``samples`` images are drawn once (seeded); ``query_fraction`` of them are queries, the rest the memory bank. A
    reading is taken at the start (random init) and every ``every_epochs`` epochs; it is skipped with a note when the
    data has no labels.
    """

    enabled: bool = True
    every_epochs: int = 1
    samples: int = 5000
    query_fraction: float = 0.2
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 500


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    output_dir: str = "runs/pretrain"
    seed: int = 0
    mixed_precision: str = "auto"
    compile: bool | None = None  # torch.compile the model; None: on with CUDA (a failure falls back with a note)
    compile_backend: str = "inductor"
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (mpp.fsdp)
    cpu: bool = False
    log_every: int = 10
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    stop_at_step: int | None = None
    viz_samples: int = 8
    progress: bool = True


# ------------------------------------------------------------------------------------------------ building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, str) and "name" in {g.name for g in fields(tp)}:
            value = {"name": value}  # model=mae_vit_tiny_patch4 means model.name=..., the spelling every stage uses
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


_YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.blr=1e-3"`` -> (["optim", "blr"], 0.001); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.epochs=5)")
    key, raw = item.split("=", 1)
    if raw.strip().lower() in _YAML11_BOOL_WORDS:  # keep "no"/"on"/... as the strings the user typed
        return key.strip().split("."), raw.strip()
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def merge(base: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``base[k1][k2]... = value`` creating mappings on the way."""
    node = base
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k!r} is not a section")
    node[keys[-1]] = value


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into ``base`` (returns ``base``)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file; an empty file is an empty recipe.

    ``include: other.yaml`` (or a list of files; paths relative to the recipe) loads those recipes first and lays
    this one's keys over them, section by section, so a recipe states only what differs from the ones it builds on.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (included from {_seen[-1]})" if _seen else ""
        raise ConfigError(f"recipe file {str(path)!r} does not exist{where}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(p.name for p in _seen)})")
    data = _read_yaml(path)
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of them, got {includes!r}")
    merged: dict[str, Any] = {}
    for name in includes:
        deep_update(merged, load_yaml(path.parent / name, (*_seen, path.resolve())))
    return deep_update(merged, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def build_config(
    cls: type, recipe: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Any:
    """Defaults, then the recipe (or ``base``: a saved run's settings), then dotted overrides; validated."""
    data: dict[str, Any] = base if base is not None else load_yaml(recipe) if recipe else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        merge(data, keys, value)
    config = from_dict(cls, data)
    validate(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return asdict(config)


# ------------------------------------------------------------------------------------------------ checks
def _check(condition: bool, key: str, value: Any, why: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_positive(section: Any, prefix: str, *names: str) -> None:
    """Each named field is ``None`` or > 0."""
    for name in names:
        value = getattr(section, name)
        _check(value is None or value > 0, f"{prefix}{name}", value, "must be positive")


def check_schedule(section: ScheduleConfig, prefix: str) -> None:
    """A schedule section's impossible values."""
    check_positive(section, prefix, "epochs", "batch_size", "accum_steps", "blr", "lr")
    _check(0 <= section.warmup_epochs <= section.epochs, f"{prefix}warmup_epochs", section.warmup_epochs,
           "must be in [0, epochs]")  # fmt: skip
    _check(section.min_lr >= 0, f"{prefix}min_lr", section.min_lr, "must be >= 0")
    _check(section.min_steps >= 0, f"{prefix}min_steps", section.min_steps, "must be >= 0")
    _check(section.weight_decay >= 0, f"{prefix}weight_decay", section.weight_decay, "must be >= 0")
    betas = getattr(section, "betas", None)
    if betas is not None:
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"{prefix}betas", betas,
               "must be two values in [0, 1)")  # fmt: skip
    check_positive(section, prefix, *(n for n in ("clip_grad", "log_every") if hasattr(section, n)))


def check_source(d: SourceConfig) -> None:
    """A data section's impossible values (the parts every stage shares)."""
    _check(d.source in SOURCES, "data.source", d.source, f"must be one of {', '.join(SOURCES)}")
    _check(d.source not in ("folder", "shards", "hf") or bool(d.path), "data.path", d.path,
           f"is required for source {d.source}")  # fmt: skip
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "must be >= 1")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std must be given together")
    if d.std is not None:
        _check(all(s > 0 for s in d.std), "data.std", d.std, "must be positive")


def check_precision(value: str) -> None:
    """``mixed_precision`` is one every stage accepts."""
    _check(value in PRECISIONS, "mixed_precision", value, f"must be one of {', '.join(PRECISIONS)}")


def validate_model(model: ModelConfig, prefix: str = "model.") -> None:
    """Impossible model values: unknown variant, ratio outside (0, 1), image not divisible by patch, ..."""
    from mpp.masking import MASK_TYPES
    from mpp.models.registry import MODEL_CONFIGS, model_config

    _check(
        model.name in MODEL_CONFIGS,
        f"{prefix}name",
        model.name,
        f"unknown model; valid: {', '.join(sorted(MODEL_CONFIGS))}",
    )
    _check(0.0 < model.mask_ratio < 1.0, f"{prefix}mask_ratio", model.mask_ratio, "must be strictly between 0 and 1")
    _check(model.mask_type in MASK_TYPES, f"{prefix}mask_type", model.mask_type, f"must be one of {MASK_TYPES}")
    _check(model.global_pool in ("token", "avg"), f"{prefix}global_pool", model.global_pool, "must be token or avg")
    _check(0.0 <= model.drop_path_rate < 1.0, f"{prefix}drop_path_rate", model.drop_path_rate, "must be in [0, 1)")
    resolved = model_config(model.name, **model_overrides(model))
    img, patch = resolved.get("img_size", 224), resolved["patch_size"]
    _check(patch > 0, f"{prefix}patch_size", patch, "must be positive")
    _check(
        img > 0 and img % patch == 0, f"{prefix}img_size", img, f"must be a positive multiple of the patch size {patch}"
    )
    if model.in_chans is not None:
        _check(model.in_chans > 0, f"{prefix}in_chans", model.in_chans, "must be positive")


def model_overrides(model: ModelConfig) -> dict[str, Any]:
    """Constructor overrides of the registry variant given by a :class:`ModelConfig`."""
    out: dict[str, Any] = {
        "norm_pix_loss": model.norm_pix_loss, "mask_ratio": model.mask_ratio, "mask_type": model.mask_type,
        "drop_path_rate": model.drop_path_rate, "global_pool": model.global_pool,
    }  # fmt: skip
    for key in ("img_size", "patch_size", "in_chans"):
        if getattr(model, key) is not None:
            out[key] = getattr(model, key)
    return out


def validate(config: PretrainConfig) -> None:
    """Check every impossible value of a pretraining config."""
    validate_model(config.model)
    d = config.data
    check_source(d)
    _check(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", d.crop_scale_min, "must be in (0, 1]")
    _check(d.limit is None or d.limit > 0, "data.limit", d.limit, "must be positive")
    if d.streaming:
        _check(d.source == "hf", "data.streaming", d.streaming, f"needs data.source=hf, not {d.source}")
        _check(not d.in_memory, "data.in_memory", d.in_memory, "cannot hold a stream; leave it unset with streaming")
        _check(d.limit is None, "data.limit", d.limit, "is not supported with streaming (use data.stream_length)")
        _check(d.stream_length is None or d.stream_length > 0, "data.stream_length", d.stream_length,
               "must be positive")  # fmt: skip
        _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
        _check(d.stream_threads >= 1, "data.stream_threads", d.stream_threads, "must be >= 1")
    check_schedule(config.optim, "optim.")
    m = config.monitor
    _check(m.every_epochs > 0, "monitor.every_epochs", m.every_epochs, "must be positive")
    _check(m.samples >= 2, "monitor.samples", m.samples, "must be at least 2 (a bank and a query)")
    _check(0 < m.query_fraction < 1, "monitor.query_fraction", m.query_fraction, "must be strictly between 0 and 1")
    _check(m.k > 0, "monitor.k", m.k, "must be positive")
    _check(m.temperature > 0, "monitor.temperature", m.temperature, "must be positive")
    _check(m.batch_size > 0, "monitor.batch_size", m.batch_size, "must be positive")
    check_precision(config.mixed_precision)
    _check(config.log_every > 0, "log_every", config.log_every, "must be positive")
    _check(config.keep_checkpoints > 0, "keep_checkpoints", config.keep_checkpoints, "must be positive")
    _check(
        config.stop_at_step is None or config.stop_at_step > 0, "stop_at_step", config.stop_at_step, "must be positive"
    )
