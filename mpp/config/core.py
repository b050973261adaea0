"""The one way every command's config is built: dataclass defaults, a YAML recipe, overrides, then ``check()``.

A recipe states only what differs from the defaults; overrides are dotted ``key=value`` strings.

Loading order is defaults -> recipe (or a saved run's settings) -> overrides. Unknown keys, wrong types and impossible
values are one-line :class:`ConfigError` s naming the key, raised before anything is written. The sections every
command shares (where images come from, a training schedule) and their checks live here too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mpp.data import SOURCES
from mpp.runtime import ConfigError, read_config

# fp32 == no (accelerate's spelling); auto: bf16 on CUDA, on CPUs fp32 except where pretraining's trial picks bf16
PRECISIONS = ("auto", "fp32", "no", "bf16", "fp16")


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
    # A seeded, stratified validation split held out of the training split (mpp.data.holdout): never pretrained on,
    # never labelled-training data; recipe choices are made on it. Pretraining and evaluation must give the same two.
    val_size: int | None = None
    val_seed: int = 0


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
    # A wall-clock budget in minutes (mpp.train.budget): the pace of the first steps fixes the step count so warmup +
    # cosine end when the budget does; ``epochs`` is then ignored. None: run ``epochs``.
    minutes: float | None = None


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
    if origin is dict:  # string keys (a YAML 10: becomes "10"), typed values
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
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
            value = {"name": value}  # model=mae_vit_tiny_patch4 means model.name=..., the spelling of every command
        elif (
            f.name == "model"
            and not dataclasses.is_dataclass(tp)
            and isinstance(value, dict)
            and set(value) == {"name"}
        ):
            value = value["name"]  # and model.name=... is accepted where the model is only a name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
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
    if not path.is_file() and not _seen:
        from mpp.recipes import packaged

        path = packaged(str(path)) or path  # a packaged recipe by name: --recipe fmnist_tiny
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
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML recipe") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def build_config(
    cls: type,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    init: str | None = None,
) -> Any:
    """Defaults, then the recipe (or ``base``: a saved run's settings), dotted overrides and ``init``; checked.

    Args:
        cls: the command's config dataclass (it has a ``check()`` method that raises :class:`ConfigError`).
        recipe: a YAML recipe.
        overrides: ``key=value`` strings.
        base: a saved run's settings instead of a recipe (``--resume``).
        init: the evaluation commands' bare ``INIT`` argument (also settable as ``init=...``, but not both ways).
    """
    data: dict[str, Any] = base if base is not None else load_yaml(recipe) if recipe else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        merge(data, keys, value)
    if init is not None:
        if "init" in data and data["init"] != init:
            raise ConfigError(f"init given twice: {init!r} and init={data['init']!r}")
        data["init"] = init
    config = from_dict(cls, data)
    config.check()
    return config


def settings_to_resume(run_dir: str | Path, recipe: str | None) -> dict[str, Any]:
    """The saved settings of the run in ``run_dir``, to continue it (``--resume``); ``output_dir`` is where it is now.

    Raises:
        ConfigError: ``run_dir`` holds no run config, or a recipe was given too.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not an mpp run directory)")
    if recipe:
        raise ConfigError("--resume takes the run's saved config; do not pass --recipe with it")
    data = read_config(saved)
    data["output_dir"] = str(run_dir)
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return asdict(config)


# ------------------------------------------------------------------------------------------------ checks
def check(condition: bool, key: str, value: Any, why: str) -> None:
    """The one config error: ``key=value: why`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_positive(section: Any, prefix: str, *names: str) -> None:
    """Each named field is ``None`` or > 0."""
    for name in names:
        value = getattr(section, name)
        check(value is None or value > 0, f"{prefix}{name}", value, "must be positive")


def check_schedule(section: ScheduleConfig, prefix: str) -> None:
    """A schedule section's impossible values."""
    check_positive(section, prefix, "epochs", "batch_size", "accum_steps", "blr", "lr", "minutes")
    check(
        section.warmup_epochs >= 0 and (section.minutes or section.warmup_epochs <= section.epochs),
        f"{prefix}warmup_epochs",
        section.warmup_epochs,
        "must be in [0, epochs]",
    )
    check(section.min_lr >= 0, f"{prefix}min_lr", section.min_lr, "must be >= 0")
    check(section.min_steps >= 0, f"{prefix}min_steps", section.min_steps, "must be >= 0")
    check(section.weight_decay >= 0, f"{prefix}weight_decay", section.weight_decay, "must be >= 0")
    betas = getattr(section, "betas", None)
    if betas is not None:
        check(
            len(betas) == 2 and all(0 <= b < 1 for b in betas), f"{prefix}betas", betas, "must be two values in [0, 1)"
        )
    check_positive(section, prefix, *(n for n in ("clip_grad", "log_every") if hasattr(section, n)))


def check_source(d: SourceConfig) -> None:
    """A data section's impossible values (the parts every stage shares)."""
    check(d.source in SOURCES, "data.source", d.source, f"must be one of {', '.join(SOURCES)}")
    check(
        d.source not in ("folder", "shards", "hf") or bool(d.path),
        "data.path",
        d.path,
        f"is required for source {d.source}",
    )
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    check(d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "must be >= 1")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std must be given together")
    if d.std is not None:
        check(all(s > 0 for s in d.std), "data.std", d.std, "must be positive")
    check(d.val_size is None or d.val_size > 0, "data.val_size", d.val_size, "must be positive (or null: no split)")


def check_precision(value: str) -> None:
    """``mixed_precision`` is one every stage accepts."""
    check(value in PRECISIONS, "mixed_precision", value, f"must be one of {', '.join(PRECISIONS)}")
