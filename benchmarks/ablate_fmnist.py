"""Recipe ablation on Fashion-MNIST: pretrain each setting, then judge its encoder the same way.

Each row runs ``mpp pretrain --recipe BASE <overrides>`` into ``runs/ablation/<name>`` (skipped when the run already
finished), times it, reads the kNN monitor's last reading from metrics.jsonl (both poolings, on a train-split
subset), then runs ``mpp evaluate`` (kNN + cached linear probe, avg pooling by default) with ``--labels`` labelled
training images per class. With ``--val-size N`` (default 5000) both the pretraining and the evaluation hold the same
seeded N training images out: they are never pretrained on, and each row records its validation figure (what a
choice is made on) beside the test figure. Results are appended to a JSON file and printed as a markdown table.
Run one at a time on an idle machine: minutes are wall-clock.

    .venv/bin/python benchmarks/ablate_fmnist.py --base recipes/fmnist_demo.yaml \\
        --row "paper_blr:optim.blr=1.5e-4" --row "blr1.5e-3:optim.blr=1.5e-3" --out benchmarks/results/ablation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MPP = [sys.executable, "-m", "mpp"]


def cpu_name() -> str:
    """The CPU model (recorded with every figure: speed differs a lot between the machines this runs on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def last_monitor(run_dir: Path) -> dict:
    """The last kNN monitor record of a run (``{}`` if none)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    monitor = [r for r in records if r.get("stage") == "monitor"]
    losses = [r["loss"] for r in records if "loss" in r]
    out = dict(monitor[-1]) if monitor else {}
    out["final_loss"] = round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None
    out["steps"] = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    return out


def pretrain(base: str, overrides: list[str], run_dir: Path, val: list[str]) -> float:
    """Run the pretraining unless finished; wall minutes (0 when it was already there)."""
    if (run_dir / "encoder.safetensors").is_file():
        return 0.0
    start = time.perf_counter()
    cmd = [*MPP, "pretrain", "--recipe", base, *val, *overrides, f"output_dir={run_dir}", "progress=false"]
    subprocess.run(cmd, check=True)
    return (time.perf_counter() - start) / 60


def evaluate(init: str, out: Path, labels: int | None, pool: str, extra: list[str]) -> dict:
    """kNN and cached linear probe top-1 (%) on the test set, and on validation when held out."""
    budget = [f"labels_per_class={labels}"] if labels else []
    cmd = [*MPP, "evaluate", init, "--recipe", "recipes/evaluate_fmnist.yaml", f"global_pool={pool}",
           f"output_dir={out}", "progress=false", *budget, *extra]  # fmt: skip
    subprocess.run(cmd, check=True)
    results = json.loads((out / "results.json").read_text())["protocols"]
    out = {}
    for name, protocol in results.items():  # knn, probe, and knn_tokens / probe_tokens for the recipe's readouts
        if isinstance(protocol, dict) and "top1" in protocol:
            out[name] = protocol["top1"]
            if protocol.get("val_top1") is not None:
                out[f"{name}_val"] = protocol["val_top1"]
    return out


def shown(row: dict, name: str) -> str:
    """``val (test)`` when the row has a validation figure, else the test figure alone."""
    test = f"{row[name]:.2f}"
    return f"{row[name + '_val']:.2f} ({test})" if row.get(name + "_val") is not None else test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base pretraining recipe")
    parser.add_argument(
        "--row", action="append", default=[], help="NAME:override override ... ('random' = no pretraining)"
    )
    parser.add_argument(
        "--labels",
        type=int,
        default=1000,
        help="labels per class for evaluation (0 = all, -1 = no evaluation: the monitor only)",
    )
    parser.add_argument("--pool", default="avg", choices=["avg", "token"])
    parser.add_argument("--model", default="mae_vit_tiny_patch4", help="architecture of the 'random' row")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation (0: none)")
    parser.add_argument("--out", default="benchmarks/results/ablation_fmnist.json")
    parser.add_argument(
        "--eval", action="append", default=[], help="an override for every row's evaluation, e.g. probe.wd_sweep=[0]"
    )
    args = parser.parse_args()
    out_path = Path(args.out)
    table = json.loads(out_path.read_text()) if out_path.is_file() else {"cpu": cpu_name(), "rows": {}}
    val = [f"data.val_size={args.val_size}"] if args.val_size else []
    for spec in args.row:
        name, _, rest = spec.partition(":")
        overrides = rest.split()
        run_dir = Path("runs/ablation") / name
        key = f"{name}@{args.labels or 'all'}/{args.pool}"
        if name == "random":
            row = {"base": None, "overrides": [], "minutes": 0.0}
            row.update(evaluate("random", run_dir / key.replace("/", "_"), args.labels, args.pool,
                                [f"model={args.model}", *val, *args.eval]))  # fmt: skip
        else:
            minutes = pretrain(args.base, overrides, run_dir, val)
            row = {"base": args.base, "overrides": overrides}
            row["minutes"] = round(minutes, 2) if minutes else table["rows"].get(key, {}).get("minutes")
            row.update(last_monitor(run_dir))
            if args.labels < 0:  # the monitor's reading only
                row.update(knn=float("nan"), probe=float("nan"))
            else:
                eval_dir = run_dir / f"eval_{key.split('@')[1].replace('/', '_')}"
                row.update(evaluate(str(run_dir), eval_dir, args.labels, args.pool, [*val, *args.eval]))
        row.update(labels_per_class=args.labels or "all", pool=args.pool, eval_overrides=args.eval)
        table["rows"][key] = row
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(table, indent=1))
        print(json.dumps({key: row}), flush=True)
    print(f"\nCPU: {table['cpu']}\n")
    print("| row | overrides | minutes | steps | loss | monitor kNN tok / avg | kNN val (test) | probe val (test) "
          "| probe on the token map val (test) | labels |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for key, r in table["rows"].items():
        mon = f"{r.get('knn_token', '-')} / {r.get('knn_avg', '-')}"
        tokens = shown(r, "probe_tokens") if "probe_tokens" in r else "-"
        print(
            f"| {key.split('@')[0]} | `{' '.join(r['overrides'])}` | {r['minutes']} | {r.get('steps', '-')} | "
            f"{r.get('final_loss', '-')} | {mon} | {shown(r, 'knn')} | {shown(r, 'probe')} | {tokens} | "
            f"{r['labels_per_class']}, {r['pool']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
