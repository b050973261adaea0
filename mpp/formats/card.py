"""The model card (``README.md``) written beside weights exported from a pretraining run.

A checkpoint on the Hugging Face Hub is usable when its card says what it is, how it was made and what it scored: the
YAML front matter (library, tags, dataset, metrics) lets the Hub index it, the body gives the settings, the results the
run's evaluations wrote (``RUN/*/results.json``: kNN, probe, fine-tune, with their label budgets and validation
figures), the last reconstruction picture, and how to load the folder in mpp, timm and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mpp.runtime import atomic_write_text

CARD = "README.md"
PICTURE = "reconstruction.png"
# Hub dataset ids of mpp's built-in sources, for the card's `datasets:` (folders and shards have none).
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}
LIBRARIES = {"hf": "transformers", "timm": "timm", "mpp": "mpp-mae"}


def is_pretraining_run(path: str | Path) -> bool:
    """Whether ``path`` is an ``mpp pretrain`` run directory (its ``config.yaml`` has the model and optimiser)."""
    config = Path(path) / "config.yaml"
    if not config.is_file():
        return False
    try:
        saved = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(saved, dict) and {"model", "optim", "data"} <= saved.keys()


def run_results(run_dir: Path) -> list[dict[str, Any]]:
    """One row per protocol of every evaluation saved inside the run (``RUN/<stage>/results.json``), in name order."""
    rows = []
    for path in sorted(run_dir.glob("*/results.json")):
        results = json.loads(path.read_text())
        labels = results.get("labels", {})
        if labels.get("labels_per_class"):
            budget = f"{labels['labels_per_class']} per class"
        elif labels.get("label_fraction"):
            budget = f"{100 * labels['label_fraction']:g}%"
        else:
            budget = "all"
        for name, entry in results.get("protocols", {}).items():
            rows.append(
                {
                    "stage": path.parent.name,
                    "protocol": name,
                    "labels": f"{budget} ({labels.get('train_used', '?')} images)",
                    "top1": entry["top1"],
                    "val_top1": entry.get("val_top1"),
                    "test_images": labels.get("test_size"),
                }
            )
    return rows


def front_matter(config: dict[str, Any], to: str, rows: list[dict[str, Any]]) -> str:
    """The card's YAML header: what the Hub indexes."""
    header: dict[str, Any] = {
        "library_name": LIBRARIES[to],
        "tags": ["mpp-mae", "mae", "masked-autoencoder", "vision-transformer", "self-supervised-learning"],
        "pipeline_tag": "image-feature-extraction",
    }
    if dataset := HUB_DATASETS.get(config["data"].get("source")) or (
        config["data"].get("path") if config["data"].get("source") == "hf" else None
    ):
        header["datasets"] = [dataset]
    if rows:
        header["metrics"] = ["accuracy"]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def loading_section(to: str, variant: str) -> str:
    """How to load the folder the card sits in."""
    if to == "hf":
        code = (
            "from transformers import ViTMAEModel\n\n"
            'model = ViTMAEModel.from_pretrained("OWNER/NAME")  # or the local folder\n'
        )
        other = "`mpp knn hf://OWNER/NAME` (or the local folder) reads it in mpp."
    elif to == "timm":
        code = (
            'import timm\n\nmodel = timm.create_model("hf-hub:OWNER/NAME", pretrained=True)  # or "local-dir:FOLDER"\n'
        )
        other = "`mpp knn hf://OWNER/NAME` (or the local folder) reads it in mpp."
    else:
        code = (
            "from mpp.formats import load_checkpoint\n\n"
            'model, info = load_checkpoint("FOLDER")  # encoder.safetensors (+ mae.safetensors: continue pretraining)\n'
        )
        other = (
            "`mpp knn hf://OWNER/NAME`, `mpp finetune hf://OWNER/NAME ...` use it directly; "
            f"`mpp convert FOLDER out --to timm|hf` turns it into the other formats ({variant})."
        )
    return f"## Load it\n\n```python\n{code}```\n\n{other}\n"


def model_card(run_dir: str | Path, dst: str | Path, to: str) -> Path:
    """Write ``DST/README.md`` (and ``DST/reconstruction.png``) for the weights exported from ``run_dir``.

    Args:
        run_dir: an ``mpp pretrain`` run directory (:func:`is_pretraining_run`).
        dst: the export's directory.
        to: the export's format (``mpp``, ``timm``, ``hf``): the card's library and loading code follow it.

    Returns:
        The card's path.
    """
    run_dir, dst = Path(run_dir), Path(dst)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    facts = config.get("_run", {})
    model, data, optim = config["model"], config["data"], config["optim"]
    variant = model.get("name") or "ViT"
    dataset = data.get("path") or data.get("source")
    rows = run_results(run_dir)
    steps, per_epoch = facts.get("total_steps"), facts.get("steps_per_epoch")
    epochs = f"{steps / per_epoch:.3g}" if steps and per_epoch else str(optim.get("epochs"))
    lines = [
        front_matter(config, to, rows),
        f"# {variant}: a masked autoencoder's encoder pretrained on {dataset} with mpp",
        "",
        f"Pretrained with [mpp](https://pypi.org/project/mpp-mae/) (`mpp pretrain`), the MAE objective (He et al. "
        f"2021): {model.get('mask_ratio')} of the patches hidden, the encoder sees the rest, a light decoder "
        f"reconstructs the hidden pixels ({'norm-pix' if model.get('norm_pix_loss') else 'pixel'} target).",
        "",
        "## Pretraining",
        "",
        "| setting | value |",
        "|---|---|",
        f"| images | {facts.get('dataset_size', '?')} ({dataset}; {data.get('val_size') or 0} held out for "
        "validation) |",
        f"| steps, epochs | {steps or '?'}, {epochs} |",
        f"| effective batch, lr | {facts.get('effective_batch', '?')}, {facts.get('lr', '?')} "
        f"(blr {optim.get('blr')}) |",
        f"| mask ratio | {model.get('mask_ratio')} |",
        f"| normalisation | mean {facts.get('mean', data.get('mean'))}, std {facts.get('std', data.get('std'))} |",
        f"| mpp, commit | {facts.get('mpp_version', '?')}, {facts.get('git_commit', '?')} |",
    ]
    if budget := facts.get("budget"):
        lines.append(f"| budget | {budget.get('minutes')} minutes |")
    if rows:
        lines += [
            "",
            "## Results",
            "",
            "Top-1 accuracy (%) from the evaluations saved in the run; choices were made on validation where a "
            "validation figure is given.",
            "",
            "| evaluation | protocol | labels | test top-1 | validation top-1 |",
            "|---|---|---|---:|---:|",
        ]
        for row in rows:
            val = "-" if row["val_top1"] is None else f"{row['val_top1']:.2f}"
            lines.append(f"| {row['stage']} | {row['protocol']} | {row['labels']} | {row['top1']:.2f} | {val} |")
    pictures = sorted((run_dir / "recon").glob("*.png"))
    if pictures:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pictures[-1], dst / PICTURE)
        lines += [
            "",
            "## Reconstructions",
            "",
            f"Rows: original, masked input, reconstruction, reconstruction with the visible patches pasted "
            f"(`{pictures[-1].name}`).",
            "",
            f"![reconstructions]({PICTURE})",
        ]
    settings = {key: config[key] for key in ("model", "data", "optim") if key in config}
    lines += [
        "",
        loading_section(to, variant),
        "## Settings",
        "",
        "The run's resolved settings; saved as a YAML file they are a recipe: `mpp pretrain --recipe FILE`.",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    dst.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(dst / CARD, "\n".join(lines))
