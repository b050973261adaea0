"""``mpp visualize SOURCE [IMAGES...] --out DIR``: what an encoder learned, as pictures and one ``index.html``.

SOURCE is anything :func:`mpp.load_checkpoint` reads (a pretraining run directory, mpp/official MAE/timm/Hugging Face
weights). IMAGES are image files or folders; without them, a seeded handful of the run's own data (the held-out split
where the source has one). Pictures (matplotlib, the ``mpp[viz]`` extra):

- reconstructions for each mask type x mask ratio, and at a larger input size through 2D interpolation of the
  position tables (needs a decoder: a run directory or a ``*_full`` / ``ViTMAEForPreTraining`` checkpoint);
- attention: the last block's cls-token attention per head and averaged, and the rollout through all blocks (the
  mean-token attention for encoders without a cls token);
- position embeddings: each patch's cosine similarity to every other, at the trained grid and after a resize;
- a PCA of the patch tokens as colours.

``index.html`` shows them all with captions saying what each shows and how it was computed.
"""

from __future__ import annotations

import argparse
import copy
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from mpp.data import build_dataset, default_stats, eval_transform
from mpp.data.images import IMAGE_EXTENSIONS, convert_channels
from mpp.formats import load_checkpoint
from mpp.masking import MASK_TYPES, make_noise
from mpp.models.mae import MaskedAutoencoder
from mpp.models.vit import ViTEncoder
from mpp.pos_embed import sincos_2d
from mpp.runtime import atomic_write_text, one_line
from mpp.viz import attention, figures
from mpp.viz.reconstruction import display_images, reconstruct

HELD_OUT_SPLITS = {"fashion-mnist": "test", "synthetic": "val"}


@dataclass
class Picture:
    """One picture of the page: its file (relative to the output directory), a heading and a caption."""

    file: str
    heading: str
    caption: str


@dataclass
class Settings:
    """What ``mpp visualize`` draws (see ``mpp visualize --help``)."""

    source: str
    images: list[str]
    out: str
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    mask_types: list[str] = field(default_factory=lambda: list(MASK_TYPES))
    num_images: int = 6
    seed: int = 0
    large_size: int | None = None  # None: twice the trained size


# ------------------------------------------------------------------------------------------------ inputs
def image_files(paths: list[str]) -> list[Path]:
    """The image files named or inside the named folders (sorted, recursively), or a one-line error."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such image file or folder")
    return files


def load_images(files: list[Path], in_chans: int, transform: Any) -> torch.Tensor:
    """Decode, convert to ``in_chans`` channels and ``transform`` each file: ``[N, C, H, W]``."""
    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                out.append(transform(convert_channels(img, in_chans)))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot be read as an image: {one_line(err)}") from err
    return torch.stack(out)


def run_data_images(source: Path, in_chans: int, transform: Any, count: int, seed: int) -> tuple[torch.Tensor, str]:
    """A seeded sample of a pretraining run's own data (its held-out split where there is one), and its description."""
    config_path = source / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{source}: no IMAGES given and no run config.yaml to find the run's data; name images")
    data = (yaml.safe_load(config_path.read_text()) or {}).get("data", {})
    name = data.get("source", "fashion-mnist")
    split = HELD_OUT_SPLITS.get(name, data.get("split", "train"))
    dataset = build_dataset(
        name,
        split,
        transform,
        path=data.get("path"),
        in_chans=in_chans,
        image_column=data.get("image_column", "image"),
        cache_dir=data.get("cache_dir"),
        synthetic_size=data.get("synthetic_size", 512),
        synthetic_classes=data.get("synthetic_classes", 4),
        seed=0,
    )
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    imgs = torch.stack([dataset[i][0] for i in picks])
    return imgs, f"{len(picks)} images of the run's data ({name}, split {split!r}, seed {seed})"


def normalisation(model: ViTEncoder, metadata: dict[str, Any], notes: list[str]) -> tuple[list[float], list[float]]:
    """The mean/std the weights were trained with, or the folder default (noted)."""
    if metadata.get("mean") is not None and metadata.get("std") is not None:
        return list(metadata["mean"]), list(metadata["std"])
    mean, std = default_stats("folder", model.in_chans)
    notes.append("normalisation not stored with the weights: ImageNet statistics assumed")
    return list(mean), list(std)


# ------------------------------------------------------------------------------------------------ pictures
def mask_noise(mask_type: str, count: int, model: MaskedAutoencoder, ratio: float, seed: int) -> torch.Tensor:
    """Seeded sort keys realising ``mask_type`` at ``ratio`` (:func:`mpp.masking.make_noise`)."""
    generator = torch.Generator().manual_seed(seed)
    noise = make_noise(mask_type, count, model.grid_size, ratio, generator=generator)
    return torch.rand(count, model.num_patches, generator=generator) if noise is None else noise


def stats_caption(model: MaskedAutoencoder) -> str:
    """How the reconstruction columns were made, in words."""
    if not model.norm_pix_loss:
        return "The decoder predicts pixels directly (no norm-pix), so its output is shown as is."
    return (
        "The model predicts per-patch normalised pixels (norm-pix), which look like noise until mapped back with a "
        "mean and std per patch. 'reconstruction' maps every hidden patch back with a mean/std estimated from "
        "the visible patches only (inverse-squared-distance weighted average of their statistics): nothing of "
        "the hidden pixels is used. The last column uses each hidden patch's true mean/std instead, as the "
        "official MAE notebook does: there brightness and contrast come from the hidden truth, only the shape "
        "inside each patch is predicted."
    )


def draw_reconstructions(
    out: Path, model: MaskedAutoencoder, imgs: torch.Tensor, mean: list[float], std: list[float], settings: Settings
) -> list[Picture]:
    """One grid per mask type x ratio at the trained size."""
    pictures = []
    for mask_type in settings.mask_types:
        for ratio in settings.mask_ratios:
            noise = mask_noise(mask_type, imgs.shape[0], model, ratio, settings.seed)
            rec = reconstruct(model, imgs, mean, std, noise=noise, mask_ratio=ratio)
            name = f"recon_{mask_type}_{round(ratio * 100)}.png"
            title = f"{mask_type} mask, {ratio:.0%} removed (loss {rec.loss:.3f})"
            figures.reconstruction_figure(out / name, rec, title)
            caption = (
                f"{mask_type.capitalize()} masking, {ratio:.0%} of the {model.num_patches} patches removed "
                f"(seed {settings.seed}); masked-patch loss {rec.loss:.3f}. Columns: input, input with removed "
                f"patches grey, the decoder's output for every patch, and the output on the removed patches "
                f"with the visible ones pasted back. {stats_caption(model)}"
            )
            pictures.append(Picture(name, f"Reconstruction: {mask_type}, {ratio:.0%}", caption))
    return pictures


def draw_large_reconstruction(
    out: Path,
    model: MaskedAutoencoder,
    large: MaskedAutoencoder,
    imgs: torch.Tensor,
    mean: list[float],
    std: list[float],
    settings: Settings,
) -> Picture:
    """A reconstruction by ``large`` (``model`` with its encoder and decoder tables moved to a larger grid)."""
    size = large.img_size[0]
    ratio = settings.mask_ratios[len(settings.mask_ratios) // 2]
    noise = mask_noise("random", imgs.shape[0], large, ratio, settings.seed)
    rec = reconstruct(large, imgs, mean, std, noise=noise, mask_ratio=ratio)
    name = f"recon_large_{size}.png"
    figures.reconstruction_figure(out / name, rec, f"{size}x{size} px, random mask, {ratio:.0%} (loss {rec.loss:.3f})")
    learned = model.pos_embed_type == "learned"
    how = (
        "the learned encoder table is resized by 2D bicubic interpolation"
        if learned
        else "the fixed sin-cos encoder table is recomputed for the grid"
    )
    caption = (
        f"The same images at {size}x{size} px ({large.grid_size[0]}x{large.grid_size[1]} patches) instead of "
        f"the trained {model.img_size[0]}x{model.img_size[1]} ({model.grid_size[0]}x{model.grid_size[1]}): "
        f"{how}; the decoder's sin-cos table is recomputed. Random mask, {ratio:.0%} removed; loss "
        f"{rec.loss:.3f}. A patch now covers a smaller part of the object, which the model never saw in "
        f"training. {stats_caption(model)}"
    )
    return Picture(name, f"Reconstruction at {size}x{size} px", caption)


def draw_attention(out: Path, model: ViTEncoder, imgs: torch.Tensor, display: torch.Tensor) -> Picture:
    """Last block's per-head and mean attention of the summary token, and the rollout."""
    maps = attention.attention_maps(model, imgs)
    prefix = model.num_prefix_tokens
    last = attention.query_attention(maps[-1], prefix, model.grid_size)
    rollout = attention.query_attention(attention.attention_rollout(maps), prefix, model.grid_size)
    who = "the cls token" if prefix else "all tokens on average (mean-token attention: the encoder has no cls token)"
    figures.attention_figure(out / "attention.png", display, last, rollout, f"attention of {who}")
    caption = (
        f"Where {who} looks in the last of {len(maps)} blocks: one map per head, their mean, then attention "
        f"rollout (head-averaged attention of every block with the skip connection as 0.5 I + 0.5 A, rows "
        f"renormalised, multiplied through the blocks), which traces how much each patch flows into the "
        f"summary through the whole network. Each map is scaled to its own maximum."
    )
    return Picture("attention.png", "Attention", caption)


def draw_positions(out: Path, model: ViTEncoder, resized: ViTEncoder) -> list[Picture]:
    """Position-embedding similarity at the trained grid, after a resize, and the sin-cos table for comparison."""
    prefix = model.num_prefix_tokens
    h, w = model.grid_size
    kind = "learned (trained) 1D" if model.pos_embed_type == "learned" else "fixed 2D sin-cos"
    sim = attention.position_similarity(model.pos_embed.detach(), prefix, model.grid_size)
    figures.position_figure(out / "pos_embed.png", sim, f"{kind} position embeddings, {h}x{w} grid")
    pictures = [
        Picture(
            "pos_embed.png",
            "Position embeddings",
            (
                f"The encoder's {kind} position table ({h}x{w} patches): the small map at row i, column j shows the "
                f"cosine similarity of patch (i, j)'s embedding to every patch's. A table that encodes the 2D grid "
                f"peaks at the patch itself and stays high along its row and column."
            ),
        )
    ]
    size, (rh, rw) = resized.img_size[0], resized.grid_size
    sim = attention.position_similarity(resized.pos_embed.detach(), prefix, resized.grid_size)
    figures.position_figure(out / "pos_embed_resized.png", sim, f"after resizing to {rh}x{rw}")
    how = "2D bicubic interpolation" if model.pos_embed_type == "learned" else "recomputing the sin-cos code"
    pictures.append(
        Picture(
            "pos_embed_resized.png",
            f"Position embeddings resized to {rh}x{rw}",
            (
                f"The same table moved to {size}x{size} px ({rh}x{rw} patches) by {how}, as fine-tuning or inference "
                f"at a larger size does; grids wider than 14 show every k-th patch's map."
            ),
        )
    )
    if model.pos_embed_type == "learned":
        table = sincos_2d(model.embed_dim, model.grid_size, prefix)
        sim = attention.position_similarity(table, prefix, model.grid_size)
        figures.position_figure(out / "pos_embed_sincos.png", sim, f"fixed 2D sin-cos table, {h}x{w} grid")
        pictures.append(
            Picture(
                "pos_embed_sincos.png",
                "For comparison: the fixed sin-cos table",
                (
                    f"The fixed 2D sin-cos table MAE uses by default, for the same {h}x{w} grid and width "
                    f"{model.embed_dim}: the structure a learned table has to discover by itself."
                ),
            )
        )
    return pictures


@torch.no_grad()
def draw_pca(out: Path, model: ViTEncoder, imgs: torch.Tensor, display: torch.Tensor) -> Picture:
    """Patch tokens of the last block on their top-3 principal components (fitted over all images) as RGB."""
    was_training = model.training
    model.eval()
    tokens = model.forward_features(imgs)[:, model.num_prefix_tokens :]
    model.train(was_training)
    joint = attention.pca_colours(tokens, model.grid_size, joint=True)
    per_image = attention.pca_colours(tokens, model.grid_size, joint=False)
    figures.pca_figure(out / "pca.png", display, joint, per_image, "patch tokens: first 3 principal components as RGB")
    caption = (
        "Each patch token of the final block (after the final norm) projected on its first three principal "
        "components, as red, green and blue. Middle row: components fitted on all shown images' tokens "
        "together, so one colour means the same feature direction in every image (when each image comes out "
        "in one flat colour, what varies most is which image a token belongs to). Bottom row: fitted per "
        "image, showing which parts of each image the encoder represents alike."
    )
    return Picture("pca.png", "Feature map (PCA of patch tokens)", caption)


# ------------------------------------------------------------------------------------------------ page
def write_index(out: Path, title: str, facts: list[str], pictures: list[Picture]) -> Path:
    """A static ``index.html`` showing every picture with its heading and caption."""
    items = "\n".join(
        f'<figure><h2>{html.escape(p.heading)}</h2><img src="{html.escape(p.file)}" alt="{html.escape(p.heading)}">'
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>"
        for p in pictures
    )
    facts_html = "".join(f"<li>{html.escape(fact)}</li>" for fact in facts)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
img{{max-width:100%;image-rendering:pixelated}}figure{{margin:2em 0}}figcaption{{color:#444;max-width:900px}}</style>
</head><body><h1>{html.escape(title)}</h1><ul>{facts_html}</ul>
{items}
</body></html>
"""
    return atomic_write_text(out / "index.html", page)


def describe(model: ViTEncoder) -> str:
    """``192-d x 6 blocks, 3 heads, patch 4, 28x28 px, cls token, learned positions`` and the like."""
    heads = model.blocks[0].attn.num_heads if len(model.blocks) else 0
    return (
        f"{model.embed_dim}-d x {len(model.blocks)} blocks, {heads} heads, patch {model.patch_size}, "
        f"{model.img_size[0]}x{model.img_size[1]} px, {model.in_chans} channel(s), "
        f"{'a' if model.num_prefix_tokens else 'no'} cls token, {model.pos_embed_type} positions"
    )


def run(settings: Settings) -> Path:
    """Draw everything into ``settings.out`` and write its ``index.html``; returns the page's path."""
    figures.pyplot()  # fail before the work when the extra is missing
    model, info = load_checkpoint(settings.source)
    model.eval()
    notes = list(info.notes)
    mean, std = normalisation(model, info.metadata, notes)
    transform = eval_transform(model.img_size, mean, std)
    if settings.images:
        files = image_files(settings.images)
        imgs = load_images(files, model.in_chans, transform)
        what = f"{len(files)} image(s): " + ", ".join(p.name for p in files[:8]) + (" ..." if len(files) > 8 else "")
    else:
        imgs, what = run_data_images(
            Path(settings.source), model.in_chans, transform, settings.num_images, settings.seed
        )
    size = settings.large_size or 2 * max(model.img_size)
    if size % model.patch_size:
        raise ValueError(f"--large-size {size} is not a multiple of the patch size {model.patch_size}")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    display = display_images(imgs, mean, std)
    resized = copy.deepcopy(model)  # the same weights at ``size`` px, for the large reconstruction and the tables
    resized.set_grid(size)

    pictures: list[Picture] = []
    if isinstance(model, MaskedAutoencoder):
        pictures += draw_reconstructions(out, model, imgs, mean, std, settings)
        large_imgs = (
            load_images(files, model.in_chans, eval_transform(size, mean, std))
            if settings.images
            else torch.nn.functional.interpolate(imgs, size=(size, size), mode="bicubic", align_corners=False)
        )
        pictures.append(draw_large_reconstruction(out, model, resized, large_imgs, mean, std, settings))
    else:
        notes.append("no decoder in this checkpoint: reconstructions skipped (give a run directory or a *_full file)")
    pictures.append(draw_attention(out, model, imgs, display))
    pictures += draw_positions(out, model, resized)
    pictures.append(draw_pca(out, model, imgs, display))
    facts = [
        f"source: {settings.source} ({info.format} format)",
        f"encoder: {describe(model)}",
        f"images: {what}",
        f"normalisation mean {mean}, std {std}",
    ] + notes
    return write_index(out, f"mpp visualize: {Path(settings.source).name}", facts, pictures)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    bad = [v for v in values if not 0 < v < 1]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"mask ratios must be in (0, 1), got {text!r}")
    return values


def _types(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in MASK_TYPES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"mask types must be among {', '.join(MASK_TYPES)}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp visualize``."""
    parser = argparse.ArgumentParser(prog="mpp visualize", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("source", help="run directory or checkpoint (mpp, official MAE, timm, Hugging Face)")
    parser.add_argument("images", nargs="*", help="image files or folders (default: a few of the run's own data)")
    parser.add_argument("--out", required=True, help="output directory for the PNGs and index.html")
    parser.add_argument("--mask-ratios", type=_floats, default=[0.5, 0.75, 0.9], help="default 0.5,0.75,0.9")
    parser.add_argument("--mask-types", type=_types, default=list(MASK_TYPES), help="default random,block,grid")
    parser.add_argument("--num-images", type=int, default=6, help="images taken from the run's data (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks and of the image choice")
    parser.add_argument("--large-size", type=int, help="side for the resized pictures (default: twice the trained)")
    args = parser.parse_args(argv)
    settings = Settings(
        args.source,
        args.images,
        args.out,
        args.mask_ratios,
        args.mask_types,
        args.num_images,
        args.seed,
        args.large_size,
    )
    try:
        page = run(settings)
    except (figures.MissingExtraError, ValueError, OSError) as err:
        print(f"mpp visualize: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"mpp visualize: wrote {page}")
    return 0
