"""Settings from the data and the budget, for a pretraining run without a recipe (like nnU-Net's fixed rules).

``mpp pretrain data.path=DIR`` (no ``--recipe``; or ``auto=true`` with any source) measures the data's fingerprint
(:mod:`mpp.data.fingerprint`) and derives every setting below from it, the machine and the wall-clock budget. Each
choice is printed with its reason; a ``key=value`` given on the command line always wins; config.yaml records the
resolved values, so ``--resume`` and evaluation never re-derive them.

==========================  =====================================================================================
setting                     rule (r = median shorter side, n = images, cpu = no CUDA device)
==========================  =====================================================================================
data.source                 ``folder`` for a directory of images, ``shards`` for one of ``*.tar``, else ``hf``
model.in_chans              1 when every sampled image is grey, else 3
model.img_size, patch_size  cpu: r capped at 64, a 4x4 grid (patch r // 4; measured on Fashion-MNIST validation: at
                            28 px 7x7 patches beat 4x4 ones by 3 kNN / 1 probe points at 5 minutes and at 30; at 56 px
                            14x14 patches beat 8x8 ones by 4.2 kNN points at 5 minutes on a 10k-image variant);
                            cuda: patch 4 up to 64 px, 8 up to 128, else 224 with patch 16 (the paper); the size is
                            rounded down to a patch multiple
model.name                  cpu or n < 50k: ``mae_vit_tiny_patch4``; cuda with n >= 50k: ``mae_vit_small_patch4``;
                            cuda, n >= 500k and r > 128: ``mae_vit_base_patch16``
model.global_pool           ``avg`` (measured: the mean patch token beats cls early in pretraining)
model.mask_ratio            0.6 for runs of at most an hour (measured on Fashion-MNIST validation at a 6-minute budget:
                            0.6 beat 0.75 by 1 kNN / 1 probe point), else 0.75 (the paper's)
data.mean, data.std         measured on the data
data.crop_scale_min         1.0 (flips only) when img_size <= 64: a 20% crop of a small image leaves flat patches
                            whose norm-pix target is noise (measured on 28 px); else 0.2 (the paper)
data.in_memory              true when the decoded images at img_size fit in a quarter of the machine's memory
data.num_workers            files read per image (not in memory): min(8, cores - 1), at least 1
optim.minutes               10 on a CPU, 60 with CUDA, unless optim.epochs or optim.minutes is given
optim.batch_size            128 (cpu) / 256 (cuda), lowered to a power of two <= n / 16 (>= 16) for small data:
                            at short budgets more steps beat bigger batches (measured)
optim.blr                   1.5e-3 (measured best for runs of minutes to an hour; the paper's 1.5e-4 barely moves
                            them)
optim.warmup_epochs         300 steps, in epochs of this data (a small folder's epochs are a few steps each); a
                            budget cuts it to a quarter of the steps it allows (mpp.train.optim.MAX_WARMUP_SHARE)
monitor.samples             min(5000, n); the cadence keeps its readings within 5% of the run (monitor.max_share)
==========================  =====================================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpp.data.fingerprint import Fingerprint

WARMUP_STEPS = 300
MEMORY_SHARE = 0.25


@dataclass
class Choice:
    """One derived setting and why."""

    key: str  # dotted, as on the command line
    value: Any
    reason: str


def infer_source(path: str) -> str:
    """``folder``, ``shards`` or ``hf`` for a ``data.path`` given without ``data.source``."""
    root = Path(path).expanduser()
    if root.is_dir():
        if any(root.glob("*.tar")) or any(root.glob("*/*.tar")):
            return "shards"
        if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
            return "hf"
        return "folder"
    if path.startswith(("/", "./", "../", "~")):
        from mpp.runtime import ConfigError

        raise ConfigError(f"data.path={path}: no such file or directory")
    return "hf"  # a Hub name or data files


def memory_bytes() -> int:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def input_size(resolution: int, cuda: bool) -> tuple[int, int, str]:
    """``(img_size, patch_size, reason)`` for images whose median shorter side is ``resolution``."""
    if not cuda:
        img = max(16, min(resolution, 64))
        # Few, large patches: a CPU step is cheap enough for several times the steps, which a short run needs more
        # than fine tokens (validation: patch 7 over 4 at 28 px, issue 19; patch 14 over 8 at 56 px, issue 20).
        patch = img // 4
        why = f"median side {resolution} px" + (", capped at 64 on a CPU" if resolution > 64 else "")
    elif resolution <= 128:
        img = max(16, resolution)
        patch = 4 if img <= 64 else 8
        why = f"median side {resolution} px"
    else:
        img, patch, why = 224, 16, f"median side {resolution} px: the paper's 224 with patch 16"
    img -= img % patch
    return img, patch, f"{why}; patch {patch} gives a {img // patch}x{img // patch} grid"


def derive(
    fp: Fingerprint,
    *,
    cuda: bool,
    minutes_given: float | None,
    epochs_given: bool,
    cores: int,
    img_size_given: int | None = None,
) -> list[Choice]:
    """Every rule's choice for data of fingerprint ``fp`` on this machine (see the module's table).

    ``minutes_given``: the budget on the command line (``None``: none); ``epochs_given``: epochs set instead;
    ``img_size_given``: ``model.img_size`` on the command line, which the patch size then follows.
    """
    n, where = fp.count, "CUDA" if cuda else "CPU"
    img, patch, size_why = input_size(img_size_given or fp.resolution, cuda)
    if img_size_given:
        size_why = f"img_size {img_size_given} given; patch {patch} follows it"
    choices = [Choice("model.in_chans", fp.channels, "every sampled image is grey" if fp.channels == 1 else "colour")]
    if cuda and n >= 500_000 and fp.resolution > 128:
        name, name_why = "mae_vit_base_patch16", f"{n} images at {fp.resolution} px on CUDA: ViT-B/16"
    elif cuda and n >= 50_000:
        name, name_why = "mae_vit_small_patch4", f"{n} images on CUDA: the small ViT (384-d, 8 blocks)"
    else:
        name, name_why = "mae_vit_tiny_patch4", f"{n} images on a {where}: the tiny ViT (192-d, 6 blocks)"
    choices += [
        Choice("model.name", name, name_why),
        Choice("model.img_size", img, size_why),
        Choice("model.patch_size", patch, f"{img // patch}x{img // patch} patches"),
        Choice("model.global_pool", "avg", "the mean patch token separates classes better early on (measured)"),
    ]
    budget = minutes_given if minutes_given else None if epochs_given else (60 if cuda else 10)
    short = budget is not None and budget <= 60
    choices.append(
        Choice(
            "model.mask_ratio",
            0.6 if short else 0.75,
            "short run: 0.6 beat 0.75 on validation at 6 minutes (measured)" if short else "the paper's, for long runs",
        )
    )
    mean, std = fp.stats(fp.channels)
    choices += [
        Choice("data.mean", list(mean), f"measured on {fp.sampled} images"),
        Choice("data.std", list(std), f"measured on {fp.sampled} images"),
    ]
    small = img <= 64
    choices.append(
        Choice(
            "data.crop_scale_min",
            1.0 if small else 0.2,
            "flips only: crops of small images leave flat patches (measured on 28 px)" if small else "the paper's",
        )
    )
    decoded = n * img * img * fp.channels
    fits = decoded <= MEMORY_SHARE * memory_bytes()
    choices.append(
        Choice(
            "data.in_memory",
            fits,
            f"{decoded / 2**20:.0f} MiB decoded at {img} px "
            + ("fits" if fits else "exceeds")
            + f" {MEMORY_SHARE:.0%} of {memory_bytes() / 2**30:.0f} GiB",
        )
    )
    if not fits:
        workers = max(1, min(8, cores - 1))
        choices.append(Choice("data.num_workers", workers, f"{cores} cores, one left for training"))
    if not minutes_given and not epochs_given:
        choices.append(Choice("optim.minutes", budget, f"a default budget on a {where}; set optim.minutes"))
    batch = 256 if cuda else 128
    while batch > 16 and batch > n // 16:
        batch //= 2
    why = "more steps beat bigger batches at short budgets (measured)"
    choices.append(Choice("optim.batch_size", batch, why if batch >= 128 else f"{n} images: at least 16 steps/epoch"))
    choices.append(Choice("optim.blr", 1.5e-3, "measured best for runs of minutes to an hour (the paper's is slow)"))
    steps_per_epoch = max(1, n // batch)
    warmup = round(WARMUP_STEPS / steps_per_epoch, 3)
    choices.append(Choice("optim.warmup_epochs", warmup, f"{WARMUP_STEPS} steps of {steps_per_epoch} per epoch"))
    if fp.classes:
        samples = min(5000, n)
        choices.append(Choice("monitor.samples", samples, "labelled: kNN on a subset, readings within 5% of the run"))
    return choices


def rule_settings(overrides: list[str], say: Any = print) -> dict[str, Any] | None:
    """The rules' settings (a nested dict under the overrides) for a no-recipe ``mpp pretrain``; ``None``: rules off.

    Rules apply when ``auto=true`` is given, or ``data.path`` is given and ``auto`` is not; the block of choices is
    printed with ``say`` (the main process only).
    """
    import torch

    from mpp.config.core import from_dict, merge, parse_override
    from mpp.config.pretrain import PretrainConfig
    from mpp.data.fingerprint import fingerprint_of

    data: dict[str, Any] = {}
    given: set[str] = set()
    for item in overrides:
        keys, value = parse_override(item)
        merge(data, keys, value)
        given.add(".".join(keys) if keys != ["model"] else "model.name")
    auto, section = data.get("auto"), data.get("data", {})
    if section.get("streaming"):  # a stream is never decoded up front: nothing to fingerprint
        return None
    if not (auto is True or (auto is None and section.get("path"))):
        return None
    settings: dict[str, Any] = {}
    if "data.source" not in given and data.get("data", {}).get("path"):
        merge(settings, ["data", "source"], infer_source(str(data["data"]["path"])))
    provisional = from_dict(PretrainConfig, _merged(settings, data))
    fp, _ = fingerprint_of(provisional.data, provisional.seed)
    cuda = torch.cuda.is_available() and not provisional.cpu
    choices = derive(
        fp, cuda=cuda, minutes_given=_given_minutes(data), epochs_given="optim.epochs" in given,
        cores=os.cpu_count() or 1, img_size_given=provisional.model.img_size if "model.img_size" in given else None,
    )  # fmt: skip
    for c in choices:
        if c.key not in given:
            merge(settings, c.key.split("."), c.value)
    if os.environ.get("RANK", "0") == "0":
        say(describe(fp, choices, given))
    return settings


def _given_minutes(data: dict[str, Any]) -> float | None:
    """``optim.minutes`` as given on the command line (``None``: not given)."""
    value = data.get("optim", {}).get("minutes")
    return float(value) if isinstance(value, int | float) else None


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a copy)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in top.items():
        out[key] = (
            {**out.get(key, {}), **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def describe(fp: Fingerprint, choices: list[Choice], given: set[str]) -> str:
    """The block printed before a no-recipe run: the fingerprint, then every choice with its reason."""
    lines = [f"mpp pretrain: no recipe; settings from the data ({fp.describe()}) and the machine:"]
    width = max(len(c.key) for c in choices)
    for c in choices:
        mark = "  (given on the command line: kept)" if c.key in given else ""
        value = ", ".join(f"{v:g}" for v in c.value) if isinstance(c.value, list) else c.value
        lines.append(f"  {c.key:<{width}}  {str(value):<22} {c.reason}{mark}")
    lines.append("  any of these can be set with key=value; config.yaml records what the run used")
    return "\n".join(lines)
