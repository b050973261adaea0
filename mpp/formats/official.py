"""Official MAE checkpoints (facebookresearch/mae) and reading a model's architecture off its tensor shapes.

Official files are pickles of ``{'model': state_dict}`` (the training script adds ``optimizer``, ``epoch``, ``scaler``
and ``args``). Their key names are mpp's: ``mae_pretrain_vit_*.pth`` hold the encoder, ``mae_pretrain_vit_*_full.pth``
and ``mae_visualize_vit_*.pth`` add the decoder. They store no configuration, so :func:`infer_config` derives it from
shapes; only the number of attention heads is invisible in the shapes and comes from the standard ViT table.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from timm.layers import to_2tuple

from mpp.pos_embed import sincos_2d

# Standard ViT heads by width (ViT-Ti/S/B/L/H); other widths get embed_dim // 64 (head dim 64).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# The paper's decoder is 512-d with 16 heads; other widths get dim // 32 (head dim 32).
DECODER_HEADS = {512: 16}
# Where checkpoints nest their weights: official MAE uses "model", timm/Lightning "state_dict".
STATE_KEYS = ("model", "state_dict", "model_state", "module")
# Prefixes added by DistributedDataParallel and torch.compile when a wrapped model was saved.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_BLOCK = r"(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
MPP_KEY = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|blocks\.\d+\."
    + _BLOCK
    + r"|mask_token|decoder_pos_embed|decoder_(embed|norm|pred)\.(weight|bias)|decoder_blocks\.\d+\."
    + _BLOCK
)


def default_num_heads(embed_dim: int) -> int:
    """Encoder heads for a width: the standard ViT table, else ``embed_dim // 64`` (lowered until it divides)."""
    return _dividing(embed_dim, STANDARD_HEADS.get(embed_dim, embed_dim // 64))


def default_decoder_num_heads(dim: int) -> int:
    """Decoder heads for a width: 16 for the paper's 512-d decoder, else ``dim // 32`` (lowered until it divides)."""
    return _dividing(dim, DECODER_HEADS.get(dim, dim // 32))


def _dividing(dim: int, heads: int) -> int:
    heads = max(heads, 1)
    while dim % heads:
        heads -= 1
    return heads


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat ``{name: tensor}`` dict inside a loaded checkpoint, with wrapper prefixes removed.

    Args:
        obj: what the file held: a state dict, or a dict nesting one under ``model``/``state_dict``/...
        source: file name for messages.

    Returns:
        ``(state, notes)``; notes say what was unwrapped or ignored.
    """
    notes: list[str] = []
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                others = sorted(str(k) for k in obj if k != key)
                extra = f" (ignored: {', '.join(others)})" if others else ""
                notes.append(f"weights read from the checkpoint's {key!r} entry{extra}")
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, dict) else [type(obj).__name__]
        raise ValueError(f"{source}: not a state dict of tensors (found {', '.join(kinds) or 'nothing'})")
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            notes.append(f"removed the {prefix!r} prefix of a wrapped model")
    return state, notes


def check_known_keys(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors mpp's ViT has no place for (register tokens, layer scale, qk-norm, ...), naming them."""
    unknown = [k for k in state if not MPP_KEY.fullmatch(k)]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ValueError(
            f"{source}: tensors with no counterpart in mpp's ViT: {shown}. mpp supports the plain ViT of MAE (no "
            "register tokens, layer scale, qk-norm or attention pooling)."
        )


def _count_blocks(state: dict[str, torch.Tensor], group: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"{group}\.(\d+)\.", k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"{group} indices are not contiguous from 0: {sorted(indices)}")
    return len(indices)


def grid_from_rows(num_patches: int, patch_size: int, source: str) -> list[int]:
    """Square image size for ``num_patches`` patches; a non-square grid must be given as ``img_size``."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{source}: {num_patches} patches do not form a square grid; pass img_size=(H, W) (--img-size H W)"
        )
    return [side * patch_size, side * patch_size]


def is_sincos(table: torch.Tensor, grid: tuple[int, int], prefix: int) -> bool:
    """Whether a position table is the fixed 2D sin-cos table (then it stays frozen, as in the official MAE)."""
    dim = table.shape[-1]
    if dim % 4:
        return False
    expected = sincos_2d(dim, grid, prefix)
    if table.shape[-2] != expected.shape[0]:
        return False
    return torch.allclose(table.reshape(expected.shape).float(), expected, atol=1e-4)


def infer_config(
    state: dict[str, torch.Tensor], source: str, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments of :class:`~mpp.models.mae.MaskedAutoencoder` (or the encoder) read off mpp-named tensors.

    Widths, depths, patch size, channels, MLP ratio, cls token, image size (square grids) and the decoder come from
    shapes and key names. Heads are not visible in shapes: the standard ViT table is used unless overridden.

    Args:
        state: mpp-named state dict.
        source: file name for messages.
        overrides: constructor arguments that win over inferred ones (``num_heads``, ``img_size``, ...).

    Returns:
        ``(config, notes)``; decoder arguments are present only when the state has a decoder.
    """
    overrides = dict(overrides or {})
    if overrides.get("img_size") is not None:
        overrides["img_size"] = list(to_2tuple(overrides["img_size"]))
    notes: list[str] = []
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        raise ValueError(f"{source}: no patch_embed.proj.weight [D, C, p, p]; not a ViT state dict")
    embed_dim, in_chans, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise ValueError(f"{source}: non-square patches {patch_h}x{patch_w} are not supported")
    depth = _count_blocks(state, "blocks")
    if depth == 0:
        raise ValueError(f"{source}: no transformer blocks (blocks.0.*) found")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    class_token = "cls_token" in state
    prefix = int(class_token)
    config: dict[str, Any] = {
        "patch_size": patch_h,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "mlp_ratio": mlp_ratio,
        "class_token": class_token,
        "global_pool": "token" if class_token else "avg",
    }
    if "pos_embed" in state:
        num_patches = state["pos_embed"].shape[-2] - prefix
        config["img_size"] = overrides.get("img_size") or grid_from_rows(num_patches, patch_h, source)
        grid = (config["img_size"][0] // patch_h, config["img_size"][1] // patch_w)
        learned = not is_sincos(state["pos_embed"], grid, prefix)
        config["pos_embed"] = "learned" if learned else "sincos"
        notes.append(f"position table: {'learned' if learned else 'fixed 2D sin-cos'}")
    elif "img_size" not in overrides:
        raise ValueError(f"{source}: no pos_embed to read the image size from; pass img_size")
    if "num_heads" not in overrides:
        config["num_heads"] = default_num_heads(embed_dim)
        notes.append(f"num_heads={config['num_heads']} assumed for width {embed_dim} (not stored; override if wrong)")
    if "decoder_embed.weight" in state:
        dec_dim = state["decoder_embed.weight"].shape[0]
        config["decoder_embed_dim"] = dec_dim
        config["decoder_depth"] = _count_blocks(state, "decoder_blocks")
        if config["decoder_depth"]:
            dec_ratio = state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dec_dim
            if dec_ratio != mlp_ratio:
                raise ValueError(
                    f"{source}: decoder MLP ratio {dec_ratio} differs from the encoder's {mlp_ratio}; mpp shares one"
                )
        if "decoder_num_heads" not in overrides:
            config["decoder_num_heads"] = default_decoder_num_heads(dec_dim)
            notes.append(f"decoder_num_heads={config['decoder_num_heads']} assumed for decoder width {dec_dim}")
    config.update(overrides)
    return config, notes
