"""Accuracy against pretraining minutes: where does a longer MAE pretraining stop paying?

Each point is one pretraining run of the same recipe at a different ``optim.minutes`` and the frozen evaluation of its
encoder (``mpp evaluate RUN ... budgets=10,100,all``, the same command for every run). For every label budget the
table gives kNN and the linear probe on both readouts, test top-1 with validation beside it, and the readout that
validation chooses; the picture draws the chosen readout's test top-1 against pretraining minutes (log axis), with
the better raw-pixel baseline of each budget as a dashed line. Only runs of one recipe make a curve: the script
refuses runs whose settings differ in anything but the budget.

    .venv/bin/python benchmarks/pretrain_minutes_curve.py \
        --point runs/tiny5_p7 runs/tiny5_p7/eff --point runs/tiny30_p7 runs/tiny30_p7/eff \
        --point runs/tiny120_p7 runs/tiny120_p7/eff --out benchmarks/results/pretrain_minutes_p7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

READOUTS = ("knn", "knn_tokens", "probe", "probe_tokens")
# Settings allowed to differ between the runs of one curve: the budget itself and what it fixes, and bookkeeping.
MAY_DIFFER = {"optim.minutes", "output_dir", "progress", "_run"}


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested config."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "_run":
            out |= flat(value, f"{name}.")
        else:
            out[name] = value
    return out


def run_point(run_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """One run's budget, steps and final loss, and its encoder's frozen results at every label budget."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    facts = config["_run"]
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in losses if row.get("stage") == "pretrain" and "loss" in row]
    report = json.loads((eval_dir / "efficiency.json").read_text())
    budgets = {}
    for point in report["encoders"]["mae"]["results"]:
        budgets[str(point["budget"])] = {
            "test": {r: point["top1"].get(r) for r in READOUTS},
            "val": {r: point["val_top1"].get(r) for r in READOUTS},
            "spread": {r: (point.get("spread") or {}).get(r) for r in READOUTS},
        }
    pixels = {}
    for point in report["encoders"].get("pixels", {}).get("results", []):
        pixels[str(point["budget"])] = max(point["top1"].values())
    return {
        "run": str(run_dir),
        "minutes": config["optim"]["minutes"],
        "steps": facts["total_steps"],
        "epochs": round(facts["total_steps"] / facts["steps_per_epoch"], 1),
        "commit": facts.get("git_commit", "")[:7],
        "final_loss": round(losses[-1], 4) if losses else None,
        "budgets": budgets,
        "pixels_best": pixels,
        "settings": {k: v for k, v in flat(config).items() if k not in MAY_DIFFER},
    }


def chosen(entry: dict[str, Any]) -> tuple[str, float, float]:
    """The readout validation chooses at one budget: ``(readout, test, val)``."""
    measured = [r for r in READOUTS if entry["val"].get(r) is not None]
    best = max(measured, key=lambda r: entry["val"][r])
    return best, entry["test"][best], entry["val"][best]


def check_one_recipe(points: list[dict[str, Any]]) -> None:
    """Refuse a curve whose runs differ in more than their budget (it would not be one recipe's curve)."""
    first = points[0]["settings"]
    for point in points[1:]:
        differ = sorted(k for k in first.keys() | point["settings"].keys() if first.get(k) != point["settings"].get(k))
        if differ:
            raise SystemExit(f"{point['run']}: differs from {points[0]['run']} in {', '.join(differ)}; not one recipe")


def markdown(points: list[dict[str, Any]]) -> str:
    """One row per run and label budget: every readout's test (val), the readout chosen on validation."""

    def cell(entry: dict[str, Any], readout: str) -> str:
        test, val, spread = entry["test"][readout], entry["val"][readout], entry["spread"][readout]
        if test is None:
            return "-"
        return f"{test:.2f}{f' ± {spread:.2f}' if spread else ''} ({val:.2f})"

    lines = [
        "| pretraining minutes | steps (epochs) | final loss | labels/class | kNN avg | kNN tokens | probe avg "
        "| probe tokens | chosen on val: test | best pixels |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        for budget, entry in point["budgets"].items():
            readout, test, _ = chosen(entry)
            pixels = point["pixels_best"].get(budget)
            lines.append(
                f"| {point['minutes']:g} | {point['steps']:,} ({point['epochs']}) | {point['final_loss']} | {budget} | "
                + " | ".join(cell(entry, r) for r in READOUTS)
                + f" | **{test:.2f}** ({readout}) | {'-' if pixels is None else f'{pixels:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def draw(points: list[dict[str, Any]], path: Path) -> None:
    """Chosen-readout test top-1 against pretraining minutes, one colour per label budget, pixels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    minutes = [p["minutes"] for p in points]
    common = [b for b in points[0]["budgets"] if all(b in p["budgets"] for p in points)]
    for i, budget in enumerate(common):
        colour = f"C{i}"
        name = "all" if budget == "all" else f"{budget}/class"
        ax.plot(minutes, [chosen(p["budgets"][budget])[1] for p in points], "o-", color=colour, label=name)
        pixels = points[0]["pixels_best"].get(budget)
        if pixels is not None:
            ax.axhline(pixels, color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
    ax.set_xlabel("pretraining minutes (2 CPU cores, log scale)")
    ax.set_ylabel("frozen encoder, test top-1 (%)")
    ax.set_title("MAE pretraining time against frozen accuracy (dashed: best raw-pixel baseline)")
    ax.grid(alpha=0.3)
    ax.legend(title="labels", loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs=2, action="append", required=True, metavar=("RUN", "EVAL_DIR"))
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes .json, .md and .png")
    args = parser.parse_args()
    points = sorted((run_point(Path(r), Path(e)) for r, e in args.point), key=lambda p: p["minutes"])
    check_one_recipe(points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(points))
    draw(points, args.out.with_suffix(".png"))
    print(markdown(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
