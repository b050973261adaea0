"""The no-recipe rules on data they were not written for: Fashion-MNIST variants and the synthetic shapes.

Each variant is written once as an image folder (``ROOT/{train,test}/<class>/*.png``: ``--train`` training images
drawn from Fashion-MNIST's training split, 1,000 test images from its test split, resized to ``side`` px), then

1. ``mpp pretrain data.path=ROOT optim.minutes=M`` (no recipe: mpp.config.rules decides the rest), timed;
2. ``mpp knn RUN`` on the folder (its train split the bank, its test split the queries), and the same for the
   random init of the model the rules chose (``mpp knn random ...``);
3. kNN on the raw pixels, the same protocol (cosine, k 20, T 0.07) on the images normalised with the run's mean/std.

With ``--val`` the pretraining and the kNN hold the same 10% of the training images out and the validation figure
is recorded too (the fit variants: what the rules were chosen on); the held-out variants report test only.
Results go to a JSON file and a markdown table. One variant at a time, on an idle machine: minutes are wall-clock.

    .venv/bin/python benchmarks/no_recipe_variants.py --variant fm1k28:1000:28 --variant fm10k56:10000:56 --val
    .venv/bin/python benchmarks/no_recipe_variants.py --variant fm3k40:3000:40 --variant shapes:synthetic
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mpp.neighbours import knn_scores

MPP = [sys.executable, "-m", "mpp"]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = 1000


def _idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(FMNIST / name).read(), np.uint8, offset=offset)


def write_variant(root: Path, train: int, side: int, seed: int = 0) -> None:
    """A seeded Fashion-MNIST subset as a class-folder tree at ``side`` px (skipped when already written)."""
    if (root / "done").is_file():
        return
    rng = np.random.default_rng(seed)
    for split, prefix, count in (("train", "train", train), ("test", "t10k", TEST_IMAGES)):
        images = _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(f"{prefix}-labels-idx1-ubyte.gz", 8)
        for i in sorted(rng.permutation(len(labels))[:count].tolist()):
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i])
            if side != 28:
                img = img.resize((side, side), Image.BICUBIC)
            img.save(folder / f"{i}.png")
    (root / "done").write_text("ok")


def run(cmd: list[str]) -> tuple[float, str]:
    """Run a command; its wall seconds and stdout (stderr passes through)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout[-3000:], flush=True)
    return time.perf_counter() - start, done.stdout


def knn_top1(cmd: list[str], out: Path) -> dict:
    """``mpp knn ...`` into ``out``: test (and validation) top-1."""
    run([*cmd, f"output_dir={out}", "progress=false"])
    entry = json.loads((out / "results.json").read_text())["protocols"]["knn"]
    return {"test": round(entry["top1"], 2), "val": round(entry["val_top1"], 2) if "val_top1" in entry else None}


def pixel_knn(source: list[str], mean: list[float], std: list[float], val_size: int | None) -> float:
    """kNN top-1 (%) on normalised raw pixels: the training split the bank, the test split the queries."""
    from mpp.data import build_dataset
    from mpp.data.holdout import without_validation

    opts = dict(zip([s.split("=")[0] for s in source], [s.split("=", 1)[1] for s in source], strict=True))
    in_chans = len(mean)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if opts["data.source"] == "synthetic":
            ds = build_dataset(
                "synthetic", split, None, in_chans=in_chans, synthetic_size=int(opts["data.synthetic_size"])
            )
        else:
            ds = build_dataset("folder", split, None, path=opts["data.path"], in_chans=in_chans)
        keep = range(len(ds))
        if split == "train" and val_size:
            keep, _ = without_validation(list(ds.targets), val_size, 0)
        x = torch.stack([torch.as_tensor(ds[i][0]).float().div(255) for i in keep])
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return x.flatten(1), torch.tensor([ds.targets[i] for i in keep])

    bank, bank_y = load("train")
    queries, query_y = load("test")
    classes = int(bank_y.max()) + 1
    votes = knn_scores(bank, bank_y, queries, classes, 20, 0.07)
    return round(100.0 * (votes.argmax(1) == query_y).float().mean().item(), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME:TRAIN:SIDE or NAME:synthetic[:SIZE]")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--val", action="store_true", help="hold out 10%% of the training images (fit variants)")
    parser.add_argument("--data-root", default="runs/variants/data")
    parser.add_argument("--out", default="benchmarks/results/no_recipe_variants.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every pretraining (e.g. model.patch_size=14: a rule tried against "
                             "another value on a fit variant); the row is named VARIANT+KEY-VALUE")  # fmt: skip
    args = parser.parse_args()
    out_path = Path(args.out)
    table = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": {}}
    for spec in args.variant:
        name, kind, *rest = spec.split(":")
        if kind == "synthetic":
            size = int(rest[0]) if rest else 2000
            source, count = ["data.source=synthetic", f"data.synthetic_size={size}", "auto=true"], size
        else:
            count, side = int(kind), int(rest[0])
            root = Path(args.data_root) / name
            write_variant(root, count, side)
            source = [f"data.path={root}"]
        val = [f"data.val_size={count // 10}"] if args.val else []
        # The data is the variant's; the row and the run are the variant's + overrides ("=" would read as a key=value
        # argument where mpp is given the run's path).
        name = "+".join([name, *(o.replace("=", "-") for o in args.set)])
        run_dir = Path("runs/variants") / name
        seconds, stdout = run([*MPP, "pretrain", *source, *val, f"optim.minutes={args.minutes}", *args.set,
                               f"output_dir={run_dir}", "progress=false"])  # fmt: skip
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        share = re.search(r"kNN monitor: (\d+) s of this session's (\d+) s \(([\d.]+)%\)", stdout)
        data_opts = [s for s in source if s != "auto=true"]
        if kind != "synthetic":
            data_opts = ["data.source=folder", *data_opts]
        trained = knn_top1([*MPP, "knn", str(run_dir), *data_opts, *val], run_dir / "knn")
        m = saved["model"]
        # the same architecture at random init: the grey or the RGB tiny variant, at the run's size and patch
        variant = {"mae_vit_tiny_patch4": {1: "mae_vit_tiny_patch4", 3: "mae_vit_tiny_patch4_32"}}.get(m["name"], {})
        model = [f"model={variant.get(m['in_chans'], m['name'])}", f"img_size={m['img_size']}",
                 f"patch_size={m['patch_size']}", "global_pool=avg",
                 f"data.mean={saved['data']['mean']}", f"data.std={saved['data']['std']}"]  # fmt: skip
        random = knn_top1([*MPP, "knn", "random", *model, *data_opts, *val], run_dir / "knn_random")
        pixels = pixel_knn(data_opts, saved["data"]["mean"], saved["data"]["std"], count // 10 if args.val else None)
        table["rows"][name] = {
            "images": count,
            "minutes_budget": args.minutes,
            "minutes_pretrain": round(seconds / 60, 2),
            "monitor_share_pct": float(share.group(3)) if share else None,
            "steps": saved["_run"].get("total_steps"),
            "model": m["name"],
            "img_size": m["img_size"],
            "patch_size": m["patch_size"],
            "in_memory": saved["_run"].get("in_memory"),
            "knn": trained,
            "knn_random": random,
            "knn_pixels_test": pixels,
            "margin_over_pixels": round(trained["test"] - pixels, 2),
            "val": args.val,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(table, indent=1))
    print("| variant | images | px | model / patch | minutes (budget) | monitor | kNN no-recipe val (test) | "
          "kNN pixels | kNN random | margin |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, r in table["rows"].items():
        knn = f"{r['knn']['val']} ({r['knn']['test']})" if r["knn"]["val"] is not None else f"{r['knn']['test']}"
        print(
            f"| {name} | {r['images']} | {r['img_size']} | {r['model']} / {r['patch_size']} | "
            f"{r['minutes_pretrain']} ({r['minutes_budget']:g}) | {r['monitor_share_pct']}% | {knn} | "
            f"{r['knn_pixels_test']} | {r['knn_random']['test']} | {r['margin_over_pixels']:+.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
