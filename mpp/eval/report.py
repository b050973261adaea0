"""Results files of the evaluation stages: results.json, a markdown table results.md, confusion-matrix PNGs.

The confusion matrix is drawn with PIL alone (no matplotlib): cells shaded by the fraction of each true class
predicted as each class, with counts and class names when there are few enough classes to read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mpp.runtime import atomic_save_image, atomic_write_json, atomic_write_text
from mpp.viz.text import pil_font, text_size

# Beyond these many classes the numbers / names would not fit in a readable picture.
MAX_CLASSES_WITH_COUNTS = 25
MAX_CLASSES_WITH_NAMES = 60


def _shade(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    low, high = (247, 251, 255), (8, 48, 107)
    return tuple(round(lo + (hi - lo) * fraction) for lo, hi in zip(low, high, strict=True))  # type: ignore[return-value]


def draw_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "") -> Image.Image:
    """A confusion-matrix heat map: rows = true class, columns = predicted, shade = row-normalised fraction."""
    n = len(class_names)
    cell = 56 if n <= 12 else 36 if n <= MAX_CLASSES_WITH_COUNTS else max(4, 1200 // max(n, 1))
    show_names = n <= MAX_CLASSES_WITH_NAMES
    font, small = pil_font(14), pil_font(11 if n <= 12 else 9)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max((text_size(probe, s, font)[0] for s in class_names), default=0) + 12 if show_names else 12
    title_h, axis_h = 30, 24
    left, top = name_w + axis_h, title_h + axis_h + name_w
    width, height = left + n * cell + 16, top + n * cell + 16
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    # Axis labels: predicted across the top, true down the left (written sideways).
    draw.text((left + max(0, n * cell // 2 - 40), title_h), "predicted", fill="black", font=font)
    side = Image.new("RGB", (160, axis_h), "white")
    ImageDraw.Draw(side).text((4, 2), "true class", fill="black", font=font)
    img.paste(side.rotate(90, expand=True), (2, top + max(0, n * cell // 2 - 80)))
    for r, row in enumerate(confusion):
        total = max(sum(row), 1)
        for c, count in enumerate(row):
            x0, y0 = left + c * cell, top + r * cell
            frac = count / total
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_shade(frac), outline=(200, 200, 200))
            if n <= MAX_CLASSES_WITH_COUNTS and count:
                text = str(count)
                tw, th = text_size(draw, text, small)
                colour = "white" if frac > 0.5 else "black"
                draw.text((x0 + (cell - tw) / 2, y0 + (cell - th) / 2 - 2), text, fill=colour, font=small)
        if r < n:
            draw.rectangle(
                [left + r * cell, top + r * cell, left + r * cell + cell - 1, top + r * cell + cell - 1],
                outline=(220, 30, 30),
            )
    if show_names:
        for i, name in enumerate(class_names):
            tw, th = text_size(draw, name, font)
            draw.text((left - tw - 6, top + i * cell + (cell - th) / 2 - 2), name, fill="black", font=font)
            label = Image.new("RGB", (tw + 8, th + 8), "white")
            ImageDraw.Draw(label).text((2, 0), name, fill="black", font=font)
            turned = label.rotate(90, expand=True)
            img.paste(turned, (left + i * cell + (cell - turned.width) // 2, top - turned.height - 4))
    return img


def save_confusion(path: Path, confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Path:
    """Draw and save a confusion-matrix PNG."""
    return atomic_save_image(draw_confusion(confusion, class_names, title), path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """A markdown summary: one row per protocol (top-1, top-5), then per-class accuracy, one column per protocol."""
    protocols: dict[str, dict[str, Any]] = results["protocols"]
    labels = results.get("labels", {})
    budget = (
        f"{labels['labels_per_class']} labels per class"
        if labels.get("labels_per_class")
        else f"{100 * labels['label_fraction']:g}% of labels"
        if labels.get("label_fraction")
        else "all labels"
    )
    lines = [
        f"# Results: {results.get('init', '?')}",
        "",
        f"Encoder: {results.get('encoder_desc', '')}. Training labels: {budget} "
        f"({labels.get('train_used', '?')} of {labels.get('train_available', '?')} images, seed "
        f"{labels.get('label_seed', '?')}). Test images: {labels.get('test_size', '?')}.",
        "",
        "| protocol | top-1 (%) | top-5 (%) | details |",
        "|---|---:|---:|---|",
    ]
    for name, entry in protocols.items():
        lines.append(f"| {name} | {_fmt(entry['top1'])} | {_fmt(entry['top5'])} | {entry.get('summary', '')} |")
    skipped = results.get("skipped", {})
    lines += ["", *[f"Not run: {name}: {why}." for name, why in skipped.items()]] if skipped else []
    names = list(next(iter(protocols.values()))["per_class"]) if protocols else []
    if names:
        lines += ["", "Per-class top-1 accuracy (%):", ""]
        lines.append("| class | " + " | ".join(protocols) + " |")
        lines.append("|---|" + "---:|" * len(protocols))
        for cls in names:
            lines.append(f"| {cls} | " + " | ".join(_fmt(e["per_class"].get(cls)) for e in protocols.values()) + " |")
    pictures = [f"![{name} confusion matrix](confusion_{name}.png)" for name in protocols]
    lines += ["", "Confusion matrices (rows: true class, columns: predicted):", "", *pictures, ""]
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict[str, Any], class_names: Sequence[str]) -> Path:
    """Write results.json, results.md and one ``confusion_<protocol>.png`` per protocol into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, entry in results["protocols"].items():
        save_confusion(
            run_dir / f"confusion_{name}.png",
            entry["confusion"],
            class_names,
            f"{name}: top-1 accuracy {entry['top1']:.2f}%",
        )
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", results_markdown(results))
    return run_dir / "results.json"
