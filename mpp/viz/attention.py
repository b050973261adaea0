"""What an encoder learned, as tensors: attention maps, attention rollout, position-embedding similarity, PCA colours.

Pure maths on an mpp :class:`~mpp.models.vit.ViTEncoder` (no plotting; :mod:`mpp.viz.figures` draws these):

- :func:`attention_maps` records every block's attention probabilities ``softmax(q k^T * scale)``. timm's blocks call
  PyTorch's fused SDPA kernel, which never materialises the probabilities, so a pre-forward hook on each block's
  ``attn`` takes the (normed) block input and recomputes ``q`` and ``k`` with the block's own ``qkv``, ``q_norm``,
  ``k_norm`` and ``scale``: the same numbers the kernel used, for any timm version that names them so.
- :func:`attention_rollout` (Abnar & Zuidema, 2020): head-averaged attention with the residual added as ``0.5 A +
  0.5 I``, rows renormalised, multiplied through the blocks: how much each input token flows into each output token.
- :func:`query_attention`: the cls token's row (the token the probe and classifier read), or, without a cls token,
  the attention each patch receives averaged over all queries (``mean-token``).
- :func:`position_similarity`: cosine similarity of every patch's position embedding to every other (the ViT
  paper's Figure 7).
- :func:`pca_colours`: patch tokens projected on their top-3 principal components, as RGB in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mpp.models.vit import ViTEncoder

ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


def _probabilities(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T * scale)`` of a timm ``Attention`` for its input ``x [N, T, D]``: ``[N, heads, T, T]``."""
    n, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@contextmanager
def recording_attention(encoder: ViTEncoder) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``encoder`` appends each block's ``[N, heads, T, T]`` probabilities."""
    maps: list[torch.Tensor] = []
    handles = []
    for index, block in enumerate(encoder.blocks):
        missing = [name for name in ATTENTION_PARTS if not hasattr(block.attn, name)]
        if missing:
            raise TypeError(f"block {index}'s attention ({type(block.attn).__name__}) has no {', '.join(missing)}")

        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            maps.append(_probabilities(module, args[0]).detach())

        handles.append(block.attn.register_forward_pre_hook(hook))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(encoder: ViTEncoder, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block for whole images.

    Args:
        encoder: an mpp encoder (a masked autoencoder works too: its encoder runs on all patches here).
        imgs: normalised ``[N, C, H, W]`` at the encoder's input size.

    Returns:
        One ``[N, heads, T, T]`` tensor per block, ``T = prefix + L`` tokens in grid order; rows sum to one.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        with recording_attention(encoder) as maps:
            encoder.forward_features(imgs)
    finally:
        encoder.train(was_training)
    return list(maps)


def attention_rollout(maps: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through all blocks: ``prod_l (residual * I + (1 - residual) * mean_heads(A_l))``.

    Args:
        maps: per-block ``[N, heads, T, T]`` probabilities, first block first.
        residual: weight of the identity standing for the skip connection (0.5 in the rollout paper).

    Returns:
        ``[N, T, T]``; row ``i`` says how much each input token contributes to output token ``i`` (rows sum to one).
    """
    rollout = None
    for probs in maps:
        mixed = probs.mean(dim=1)
        eye = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = residual * eye + (1 - residual) * mixed
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one block")
    return rollout


def query_attention(probs: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The attention the image's summary reads, as a map over the patch grid.

    Args:
        probs: ``[N, heads, T, T]`` (one block) or ``[N, T, T]`` (heads merged, e.g. a rollout).
        num_prefix_tokens: 1 with a cls token, 0 without.
        grid_size: ``(h, w)`` patches.

    Returns:
        ``[N, heads, h, w]`` (or ``[N, h, w]``): with a cls token its row over the patches (the cls token's own
        share left out, so a map sums to at most one); without, the mean over all queries of the attention each patch
        receives (sums to one).
    """
    h, w = grid_size
    over_patches = probs[..., 0, num_prefix_tokens:] if num_prefix_tokens else probs.mean(dim=-2)
    return over_patches.reshape(*over_patches.shape[:-1], h, w)


def position_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding to all others.

    Args:
        pos_embed: ``[1, prefix + h*w, D]`` or ``[prefix + h*w, D]``.
        num_prefix_tokens: leading rows (cls) left out.
        grid_size: ``(h, w)``.

    Returns:
        ``[h, w, h, w]``: entry ``[i, j]`` is the map of patch ``(i, j)``'s similarity to every patch.
    """
    table = pos_embed.reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:].float()
    h, w = grid_size
    if table.shape[0] != h * w:
        raise ValueError(f"position table has {table.shape[0]} patch rows, grid {h}x{w} needs {h * w}")
    unit = torch.nn.functional.normalize(table, dim=-1)
    return (unit @ unit.T).reshape(h, w, h, w)


def pca_colours(tokens: torch.Tensor, grid_size: tuple[int, int], joint: bool = True) -> torch.Tensor:
    """Patch tokens on their top-3 principal components, as colours.

    Args:
        tokens: ``[N, L, D]`` patch tokens (no prefix tokens).
        grid_size: ``(h, w)`` with ``h * w == L``.
        joint: fit the components on the tokens of all images together, so one colour means one direction in feature
            space across the whole set (as DINO's pictures); else per image, which shows the structure inside each
            image even when what differs most between tokens is which image they come from.

    Returns:
        ``[N, 3, h, w]`` in ``[0, 1]``; each component min-max scaled over the tokens it was fitted on.
    """
    n, length, dim = tokens.shape
    h, w = grid_size
    if not joint:
        return torch.cat([pca_colours(tokens[i : i + 1], grid_size) for i in range(n)])
    flat = tokens.reshape(n * length, dim).float()
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    components = min(3, v.shape[0])
    projected = flat @ v[:components].T
    if components < 3:  # fewer than three directions: pad with zeros (mid grey after scaling)
        projected = torch.cat([projected, projected.new_zeros(projected.shape[0], 3 - components)], dim=1)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    return scaled.reshape(n, h, w, 3).permute(0, 3, 1, 2).contiguous()
