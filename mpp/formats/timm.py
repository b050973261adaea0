"""timm ``VisionTransformer`` state dicts: reading them into mpp and writing mpp encoders for timm.

mpp's encoder parameters already carry timm's names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.{i}.*``, ``norm.*``), so the weights pass unchanged. What differs is where the final LayerNorm sits when
pooling by average:

- mpp (and the MAE encoder being pretrained) normalises every token with ``norm`` and then averages patch tokens.
- timm with ``global_pool='avg'`` by default replaces ``norm`` with ``Identity`` and normalises the *average* with
  ``fc_norm`` (as the official MAE fine-tuning does), which is a different function.

Export therefore asks timm for ``fc_norm=False``: timm then keeps ``norm`` on every token and pools after it, so
``forward_features`` and the pooled ``forward_head(pre_logits=True)`` equal mpp's ``forward_features`` and ``embed``.
On import, a timm/official ``fc_norm`` (with no ``norm``) becomes mpp's ``norm``; mpp then normalises before averaging
instead of after, which a note reports (the pooled features are not the same function; fine-tune before using them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mpp.models.vit import ViTEncoder
from mpp.runtime import read_json

# timm factory names by (width, depth, heads); the kwargs written next to the weights override the name's own values,
# so the name only has to be a registered ViT.
_TIMM_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
               (1024, 24, 16): "vit_large", (1280, 32, 16): "vit_huge"}  # fmt: skip
FALLBACK_ARCH = "vit_base_patch16_224"
TIMM_SUFFIXES = (".safetensors", ".pth", ".bin")


def timm_to_mpp(
    state: dict[str, torch.Tensor], img_size: list[int] | None = None
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """Adapt a timm (or official fine-tuned) ViT state dict to mpp's encoder.

    - ``head.*`` (a classifier) is dropped: mpp's encoder has no head.
    - ``fc_norm.*`` without ``norm.*`` (average pooling) becomes ``norm.*`` and ``global_pool='avg'``.
    - a position table without the cls row (timm ``no_embed_class=True``) gets a zero row in front, which gives the
      cls token no position exactly as timm does.

    Args:
        state: timm-named tensors.
        img_size: the image size, when known, to tell a missing cls row from a non-square grid.

    Returns:
        ``(state, notes, config_hints)``; hints are constructor arguments implied by the keys.
    """
    state = dict(state)
    notes: list[str] = []
    hints: dict[str, Any] = {}
    heads = {k: tuple(state.pop(k).shape) for k in [k for k in state if k.startswith("head.")]}
    if heads:
        shapes = ", ".join(f"{k} {list(s)}" for k, s in heads.items())
        notes.append(f"classifier head ignored ({shapes}): mpp's encoder has no head")
    if "fc_norm.weight" in state:
        if "norm.weight" in state:
            notes.append("fc_norm ignored: the checkpoint also has norm, which mpp applies before pooling")
            state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
        else:
            state = {("norm." + k[len("fc_norm.") :] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
            hints["global_pool"] = "avg"
            notes.append(
                "fc_norm became norm with global_pool='avg': mpp normalises each token before averaging, the source "
                "normalised the average, so pooled features differ (fine-tune before relying on them)"
            )
    pos = state.get("pos_embed")
    proj = state.get("patch_embed.proj.weight")
    if pos is not None and proj is not None and "cls_token" in state:
        rows, patch = pos.shape[-2], proj.shape[-1]
        if img_size is not None:
            missing_cls_row = rows == (img_size[0] // patch) * (img_size[1] // patch)
        else:
            missing_cls_row = math.isqrt(rows) ** 2 == rows and math.isqrt(rows - 1) ** 2 != rows - 1
        if missing_cls_row:
            state["pos_embed"] = torch.cat([pos.new_zeros(*pos.shape[:-2], 1, pos.shape[-1]), pos], dim=-2)
            notes.append("position table had no cls row (timm no_embed_class): a zero row was added, same function")
    return state, notes, hints


def timm_kwargs(model: ViTEncoder) -> dict[str, Any]:
    """``timm`` ``VisionTransformer`` arguments that rebuild ``model``'s encoder with identical features.

    Use as ``timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)`` or
    ``timm.models.vision_transformer.VisionTransformer(**kwargs)``.
    """
    cfg = model.encoder_config
    img_size = cfg["img_size"]
    return {
        "img_size": img_size[0] if img_size[0] == img_size[1] else list(img_size),
        "patch_size": cfg["patch_size"],
        "in_chans": cfg["in_chans"],
        "embed_dim": cfg["embed_dim"],
        "depth": cfg["depth"],
        "num_heads": cfg["num_heads"],
        "mlp_ratio": cfg["mlp_ratio"],
        "class_token": cfg["class_token"],
        "global_pool": cfg["global_pool"],
        # Keep `norm` on every token (mpp's function) instead of timm's avg-pool default of fc_norm on the average.
        "fc_norm": False,
        "num_classes": 0,
    }


def timm_architecture(kwargs: dict[str, Any]) -> str:
    """A registered timm ViT name matching the kwargs when one exists, else ``vit_base_patch16_224``."""
    import timm

    family = _TIMM_NAMES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    size = kwargs["img_size"]
    if family and isinstance(size, int) and kwargs["mlp_ratio"] == 4.0:
        name = f"{family}_patch{kwargs['patch_size']}_{size}"
        if timm.is_model(name):
            return name
    return FALLBACK_ARCH


def to_timm(model: ViTEncoder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder's state dict in timm names (decoder dropped) and the timm kwargs that fit it strictly."""
    state = model.encoder_state_dict() if hasattr(model, "encoder_state_dict") else model.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}, timm_kwargs(model)


def timm_config(model: ViTEncoder, mean: list[float] | None = None, std: list[float] | None = None) -> dict[str, Any]:
    """The timm hub ``config.json`` for exported weights (``timm.create_model("local-dir:DIR", pretrained=True)``)."""
    kwargs = timm_kwargs(model)
    pretrained_cfg: dict[str, Any] = {
        "input_size": [model.in_chans, *model.img_size],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if mean is not None and std is not None:
        pretrained_cfg.update(mean=list(mean), std=list(std))
    return {
        "architecture": timm_architecture(kwargs),
        "num_classes": 0,
        "num_features": model.embed_dim,
        "global_pool": kwargs["global_pool"],
        "model_args": kwargs,
        "pretrained_cfg": pretrained_cfg,
    }


def save_timm(
    model: ViTEncoder,
    dst: str | Path,
    *,
    pth: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> list[Path]:
    """Write the encoder for timm.

    Args:
        model: an mpp encoder or masked autoencoder (the decoder is not exported).
        dst: a directory (gets ``model.safetensors`` or ``pytorch_model.bin`` and timm's ``config.json``, loadable
            with ``timm.create_model("local-dir:DST", pretrained=True)``), or a file ``*.safetensors``, ``*.pth`` or
            ``*.bin`` (gets the same JSON beside it, ``*.json``).
        pth: in a directory, write a pickle ``pytorch_model.bin`` instead of safetensors.
        mean: per-channel normalisation mean for the config (optional).
        std: per-channel normalisation std for the config (optional).

    Returns:
        The files written.
    """
    dst = Path(dst)
    state, _ = to_timm(model)
    config = timm_config(model, mean, std)
    if dst.suffix in TIMM_SUFFIXES:
        weights, config_path = dst, dst.with_suffix(".json")
    else:
        weights = dst / ("pytorch_model.bin" if pth else "model.safetensors")
        config_path = dst / "config.json"
    weights.parent.mkdir(parents=True, exist_ok=True)
    if weights.suffix == ".safetensors":
        save_file(state, str(weights), metadata={"format": "pt"})
    else:
        torch.save(state, weights)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return [weights, config_path]


def read_timm_config(path: Path) -> dict[str, Any]:
    """The timm config of a weights file or directory (``config.json`` or ``<file>.json``); ``{}`` if there is none."""
    candidate = path / "config.json" if path.is_dir() else path.with_suffix(".json")
    if not candidate.is_file():
        return {}
    config = read_json(candidate)
    return config if "architecture" in config else {}


def hints_from_timm_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(constructor hints, metadata)`` from a timm config: heads, pooling, image size, mean and std."""
    args = config.get("model_args", {})
    hints = {k: args[k] for k in ("num_heads", "img_size", "global_pool") if k in args}
    if "img_size" in hints:
        size = hints["img_size"]
        hints["img_size"] = [size, size] if isinstance(size, int) else list(size)
    if hints.get("global_pool") not in (None, "token", "avg"):
        hints.pop("global_pool")
    cfg = config.get("pretrained_cfg", {})
    meta = {k: list(cfg[k]) for k in ("mean", "std") if k in cfg}
    return hints, meta
