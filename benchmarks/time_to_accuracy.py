"""Time to a good encoder: mpp's 30-minute Fashion-MNIST recipe against the paper's recipe on Hugging Face's ViTMAE.

Both runs get the same wall-clock (``--minutes``, the whole run: model, data, compile and monitor included), one after
the other on an otherwise idle machine, on the same 55,000 training images (the 5,000 validation images of
``recipes/fmnist_tiny.yaml`` held out of both), the same tiny ViT (192-d, 6 blocks) and the same initialisation (the
official MAE init as mpp draws it, seeded, copied into ``ViTMAEForPreTraining`` with its sin-cos tables, as the test
oracle does). The patch size is a recipe choice: mpp's recipe cuts 7x7 patches (chosen on validation); the reference
keeps the variant's 4x4 (``--reference-patch-size 7`` gives it mpp's instead, to compare the rest of the recipes alone):

- **mpp**: ``mpp pretrain --recipe fmnist_tiny optim.minutes=M`` (mask 0.6, blr 1.5e-3, batch 128, flips only,
  in-memory batches), a checkpoint every ``--mpp-checkpoint-steps`` steps; a reading's time is when the checkpoint's
  ``state.json`` was written, counted from the command's start.
- **reference**: the paper's recipe as a user would write it for ``ViTMAEForPreTraining``: mask 0.75, norm-pix loss,
  blr 1.5e-4 at batch 256 (lr = blr x 256 / 256), AdamW (0.9, 0.95), weight decay 0.05 (none on biases and norms),
  warmup 5% of the steps (the paper's 40 of 800 epochs) then half-cosine to 0, RandomResizedCrop 0.2-1 + flip, a
  per-image ``DataLoader`` with ``--workers`` workers. Its step count is fixed by the pace of its first steps, as
  ``optim.minutes`` does for mpp, so both schedules end at the budget. A snapshot of the weights every ``--read-every``
  minutes (copied in memory; the copy is inside the timed run).

Afterwards, untimed, every checkpoint and snapshot is read by the same kNN monitor (the seeded 5,000-image subset of
the training images mpp's own monitor uses: 1,000 queries, 4,000 bank, cosine k 20, T 0.07, average pooling), and the
final encoder of each by kNN on the full bank (55,000 training images, 10,000 test queries) and, with ``--probe``, by
``mpp probe --recipe probe_fmnist`` on the average patch token (its lr and weight decay chosen on the 5,000 validation
images; the reference's final encoder is saved as ``RUNS/reference/encoder.safetensors`` for it). Output: the
curves (PNG), minutes to reach monitor kNN 80 and 85 (">M" where a run never does), JSON and a markdown table with the
machine.

    .venv/bin/python benchmarks/time_to_accuracy.py --minutes 30 --probe    # ~75 minutes in all
    .venv/bin/python benchmarks/time_to_accuracy.py --minutes 3 --read-every 1 --mpp-checkpoint-steps 60   # a try
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_facts, write_report  # noqa: E402

from mpp.config import PretrainConfig, build_config  # noqa: E402
from mpp.data import build_dataset, default_stats  # noqa: E402
from mpp.data.holdout import without_validation  # noqa: E402
from mpp.data.transforms import eval_transform, pretrain_transform  # noqa: E402
from mpp.eval.encoders import load_init  # noqa: E402
from mpp.formats.hf import hf_to_mpp, installed_layout, to_hf  # noqa: E402
from mpp.formats.native import save_encoder  # noqa: E402
from mpp.models import ViTEncoder, create_model  # noqa: E402
from mpp.neighbours import knn_scores  # noqa: E402
from mpp.train.monitor import KnnMonitor, pooled_features  # noqa: E402

THRESHOLDS = (80.0, 85.0)


def recipe() -> PretrainConfig:
    """mpp's shipped 30-minute recipe: its model, validation split and monitor subset; its normalisation resolved."""
    config = build_config(PretrainConfig, "fmnist_tiny")
    if config.data.mean is None or config.data.std is None:
        config.data.mean, config.data.std = (list(v) for v in default_stats("fashion-mnist", 1))  # grey
    return config


def training_indices(config: PretrainConfig) -> list[int]:
    """The training images both runs see: Fashion-MNIST's training split less the recipe's validation images."""
    targets = build_dataset("fashion-mnist", "train", None).targets
    keep, _ = without_validation(list(targets), config.data.val_size, config.data.val_seed)
    return keep


def run_mpp(minutes: float, every_steps: int, out: Path) -> dict[str, Any]:
    """``mpp pretrain --recipe fmnist_tiny`` for ``minutes``; its checkpoints and when each was complete."""
    if out.exists():  # mpp would resume it, and the clock would measure the rest of an old run
        raise SystemExit(f"{out} exists: remove it or give another --runs")
    start = time.time()
    cmd = [sys.executable, "-m", "mpp", "pretrain", "--recipe", "fmnist_tiny", f"optim.minutes={minutes}",
           f"checkpoint_every_steps={every_steps}", "keep_checkpoints=100000", f"output_dir={out}",
           "progress=false"]  # fmt: skip
    subprocess.run(cmd, check=True)
    wall = time.time() - start
    points = []
    for state in sorted((out / "checkpoints").glob("step_*/state.json")):
        points.append({"seconds": state.stat().st_mtime - start, "weights": str(state.parent)})
    return {"wall_s": wall, "points": points, "final": str(out)}


def hf_reference_model(config: PretrainConfig, patch_size: int | None) -> Any:
    """``ViTMAEForPreTraining`` of the recipe's variant (``patch_size``: None for the variant's own) with mpp's
    initial weights (tables included), mask 0.75."""
    import transformers

    torch.manual_seed(config.seed)
    mae = create_model(config.model.name, mask_ratio=0.75, norm_pix_loss=True, **patch_override(patch_size))
    state, kwargs = to_hf(mae, installed_layout())
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**kwargs))
    model.load_state_dict(state)
    return model


def patch_override(patch_size: int | None) -> dict[str, int]:
    """``create_model`` keywords for the reference's patch size (none: the registry variant's)."""
    return {} if patch_size is None else {"patch_size": patch_size}


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The official split: no decay on biases and 1-d parameters (norms), ``weight_decay`` on the rest."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def run_reference(
    config: PretrainConfig, minutes: float, read_every: float, workers: int, patch_size: int | None
) -> dict[str, Any]:
    """The paper's recipe on Hugging Face's ViTMAE for ``minutes`` of wall-clock; snapshots every ``read_every``."""
    start = time.perf_counter()
    budget_s, batch, timed_from, timed_to = minutes * 60, 256, 2, 12
    model = hf_reference_model(config, patch_size).train()
    mean, std = config.data.mean, config.data.std
    data = Subset(build_dataset("fashion-mnist", "train", pretrain_transform(28, mean, std)), training_indices(config))
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    base_lr = 1.5e-4 * batch / 256
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=base_lr, betas=(0.9, 0.95))
    total_steps, warmup_steps = None, 100  # provisional warmup until the pace is known (it is after step 12)
    snapshots, step, next_read, timed_start = [], 0, read_every * 60, 0.0
    while True:
        for images, _ in loader:
            if total_steps is not None:
                t = step / max(1, total_steps)
                lr = base_lr * (step / warmup_steps if step < warmup_steps else 0.5 * (1 + math.cos(math.pi * t)))
            else:
                lr = base_lr * min(1.0, step / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(pixel_values=images).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            elapsed = time.perf_counter() - start
            if step == timed_from:
                timed_start = elapsed
            if step == timed_to:  # fix the schedule so that it ends with the budget, as optim.minutes does
                pace = (elapsed - timed_start) / (timed_to - timed_from)
                total_steps = max(step + 1, int(step + (budget_s - elapsed) / pace))
                warmup_steps = max(1, round(0.05 * total_steps))
            if elapsed >= next_read:
                snapshots.append({"seconds": elapsed, "step": step, "state": clone_state(model)})
                next_read += read_every * 60
            if elapsed >= budget_s or (total_steps is not None and step >= total_steps):
                snapshots.append({"seconds": elapsed, "step": step, "state": clone_state(model)})
                return {"wall_s": elapsed, "steps": step, "total_steps": total_steps, "points": snapshots,
                        "loss": loss.item()}  # fmt: skip


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (a few MB for the tiny model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def encoder_of(
    weights: str | dict[str, torch.Tensor], config: PretrainConfig, patch_size: int | None = None
) -> ViTEncoder:
    """The encoder of an mpp checkpoint/run directory, or of a Hugging Face ViTMAE state (the whole MAE: its decoder
    is not used by the readings) with the reference's ``patch_size``."""
    if isinstance(weights, str):
        return load_init(weights)[0].eval()
    mae = create_model(config.model.name, **patch_override(patch_size))
    mae.load_state_dict(hf_to_mpp(weights))
    return mae.eval()


def save_reference(encoder: ViTEncoder, config: PretrainConfig, steps: int, run_dir: Path) -> Path:
    """The reference's final encoder as an mpp run directory would hold it, so ``mpp probe`` reads it."""
    return save_encoder(encoder, run_dir / "encoder.safetensors", variant=config.model.name, mean=config.data.mean,
                        std=config.data.std, source="fashion-mnist", norm_pix_loss=True, steps=steps,
                        val_size=config.data.val_size, val_seed=config.data.val_seed)  # fmt: skip


def probe_top1(run_dir: Path) -> dict[str, float]:
    """``mpp probe RUN --recipe probe_fmnist`` on the average patch token (the monitor's readout, the same for both
    runs; an encoder's own default would read the class token for one and the average for the other), the recipe's
    validation images choosing lr and decay: val and test top-1."""
    out = run_dir / "probe"
    cmd = [sys.executable, "-m", "mpp", "probe", str(run_dir), "--recipe", "probe_fmnist", "data.val_size=5000",
           "global_pool=avg", f"output_dir={out}", "progress=false"]  # fmt: skip
    subprocess.run(cmd, check=True)
    entry = json.loads((out / "results.json").read_text())["protocols"]["probe"]
    return {"val": round(entry["val_top1"], 2), "test": round(entry["top1"], 2)}


@torch.no_grad()
def full_bank_knn(encoder: ViTEncoder, config: PretrainConfig) -> float:
    """kNN top-1 (%) with every training image the run saw as the bank and the 10,000 test images as queries."""
    tf = eval_transform(28, config.data.mean, config.data.std)

    def features(split: str, keep: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset("fashion-mnist", split, tf)
        idx = keep if keep is not None else list(range(len(ds)))
        loader = DataLoader(Subset(ds, idx), batch_size=512, num_workers=0)
        feats = torch.cat([pooled_features(encoder, x)["avg"] for x, _ in loader])
        return feats, torch.tensor([ds.targets[i] for i in idx])

    bank, bank_y = features("train", training_indices(config))
    queries, query_y = features("test", None)
    votes = knn_scores(bank, bank_y, queries, 10, 20, 0.07)
    return round(100.0 * (votes.argmax(1) == query_y).float().mean().item(), 2)


def minutes_to(curve: list[dict[str, Any]], threshold: float, minutes: float) -> str:
    """The first reading's minute at or above ``threshold``, or ``">M"``."""
    for point in curve:
        if point["knn_avg"] >= threshold:
            return f"{point['minutes']:.1f}"
    return f">{minutes:g}"


def draw(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Monitor kNN against minutes, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([p["minutes"] for p in curve], [p["knn_avg"] for p in curve], marker="o", label=name)
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("wall-clock minutes (whole run)")
    ax.set_ylabel("monitor kNN top-1 (%), avg pooling")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock of each run")
    parser.add_argument("--read-every", type=float, default=3.0, help="minutes between reference snapshots")
    parser.add_argument("--mpp-checkpoint-steps", type=int, default=300, help="steps between mpp checkpoints")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--no-full-bank", action="store_true", help="skip the final full-bank kNN (minutes each)")
    parser.add_argument("--probe", action="store_true", help="a linear probe of each final encoder (minutes each)")
    parser.add_argument("--reference-patch-size", type=int, default=None,
                        help="the reference's patch size (default: the variant's 4; mpp's recipe uses 7)")  # fmt: skip
    parser.add_argument("--runs", default="runs/time_to_accuracy")
    parser.add_argument("--out", default="benchmarks/results/time_to_accuracy.json")
    args = parser.parse_args()
    config, runs = recipe(), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    peak = {}
    mpp_run = run_mpp(args.minutes, args.mpp_checkpoint_steps, runs / "mpp")
    patch = args.reference_patch_size
    reference = run_reference(config, args.minutes, args.read_every, args.workers, patch)
    reference_final = encoder_of(reference["points"][-1]["state"], config, patch)
    save_reference(reference_final, config, reference["steps"], runs / "reference")
    if sys.platform == "linux":
        import resource

        peak["reference_and_harness_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        peak["mpp_max_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    tf = eval_transform(28, config.data.mean, config.data.std)
    seen = Subset(build_dataset("fashion-mnist", "train", tf), training_indices(config))
    monitor = KnnMonitor.from_dataset(seen, config.monitor.samples, config.monitor.query_fraction, config.seed)
    assert monitor is not None
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, run in (("mpp fmnist_tiny", mpp_run), ("reference (paper recipe, HF ViTMAE)", reference)):
        curve = []
        for point in run["points"]:
            reading = monitor.measure(encoder_of(point.get("weights") or point["state"], config, patch))
            curve.append({"minutes": round(point["seconds"] / 60, 2), "knn_avg": round(reading.top1["avg"], 2)})
        curves[name] = curve
    finals = {name: None for name in curves}
    if not args.no_full_bank:
        finals["mpp fmnist_tiny"] = full_bank_knn(encoder_of(mpp_run["final"], config), config)
        finals["reference (paper recipe, HF ViTMAE)"] = full_bank_knn(reference_final, config)
    probes: dict[str, dict[str, float] | None] = dict.fromkeys(curves)
    if args.probe:
        probes["mpp fmnist_tiny"] = probe_top1(Path(mpp_run["final"]))
        probes["reference (paper recipe, HF ViTMAE)"] = probe_top1(runs / "reference")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(curves, out.with_suffix(".png"))
    rows = {
        name: {
            "wall_minutes": round(run["wall_s"] / 60, 2),
            "curve": curves[name],
            **{f"minutes_to_{t:g}": minutes_to(curves[name], t, args.minutes) for t in THRESHOLDS},
            "final_full_bank_knn": finals[name],
            "final_probe": probes[name],
        }
        for name, run in (("mpp fmnist_tiny", mpp_run), ("reference (paper recipe, HF ViTMAE)", reference))
    }
    report = {"machine": machine_facts(), "minutes": args.minutes, "workers": args.workers, "peak_memory": peak,
              "reference_steps": reference["steps"], "mpp_patch_size": config.model.patch_size,
              "reference_patch_size": reference_final.encoder_config["patch_size"], "rows": rows}  # fmt: skip
    write_report(out, report)
    lines = [
        "| run | wall min | monitor kNN at the end | min to 80 | min to 85 | full-bank kNN | probe val (test) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        probe = row["final_probe"]
        probe_cell = f"{probe['val']} ({probe['test']})" if probe else "-"
        lines.append(f"| {name} | {row['wall_minutes']} | {row['curve'][-1]['knn_avg']} | {row['minutes_to_80']} | "
                     f"{row['minutes_to_85']} | {row['final_full_bank_knn']} | {probe_cell} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
