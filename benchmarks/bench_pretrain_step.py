"""Pretraining step speed: mpp's MAE against Hugging Face's ViTMAEForPreTraining, same weights, same batch.

Each case times forward + backward + AdamW step, interleaving the two models so machine noise hits both alike, and
reports the median and the mpp/HF speed ratio. Also checks the two losses agree on the timed batch (same noise).

    .venv/bin/python benchmarks/bench_pretrain_step.py [--quick] [--out benchmarks/results/pretrain_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import mpp
from mpp.formats.hf import hf_config_kwargs, mpp_to_hf

CASES = {
    # name: (variant, overrides, batch)
    "tiny_fmnist_28px": ("mae_vit_tiny_patch4", {}, 128),
    "small_fmnist_28px": ("mae_vit_small_patch4", {}, 128),
    "vit_base_224px": ("mae_vit_base_patch16", {}, 8),
}


def build_pair(variant: str, overrides: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = mpp.create_model(variant, norm_pix_loss=True, **overrides)
    config = transformers.ViTMAEConfig(**hf_config_kwargs(ours), hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)  # fmt: skip
    theirs = transformers.ViTMAEForPreTraining(config)
    theirs.load_state_dict(mpp_to_hf(ours.state_dict()))  # all tensors, position tables included
    return ours, theirs


def time_steps(model, imgs, noise, call, repeats: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = call(model, imgs, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def run_case(name: str, variant: str, overrides: dict, batch: int, repeats: int) -> dict:
    ours, theirs = build_pair(variant, overrides)
    imgs = torch.randn(batch, ours.in_chans, *ours.img_size)
    noise = torch.rand(batch, ours.num_patches)
    with torch.no_grad():
        loss_ours = ours(imgs, noise=noise).loss.item()
        loss_theirs = theirs(pixel_values=imgs, noise=noise).loss.item()

    def call_ours(m, x, n):
        return m(x, noise=n).loss

    def call_theirs(m, x, n):
        return m(pixel_values=x, noise=n).loss

    for model, call in ((ours, call_ours), (theirs, call_theirs)):  # warm-up
        time_steps(model, imgs, noise, call, 2)
    t_ours, t_theirs = [], []
    for _ in range(repeats):  # interleaved
        t_ours += time_steps(ours, imgs, noise, call_ours, 1)
        t_theirs += time_steps(theirs, imgs, noise, call_theirs, 1)
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "case": name, "variant": variant, "batch": batch, "repeats": repeats,
        "mpp_step_s": med_ours, "hf_step_s": med_theirs,
        "mpp_images_per_s": batch / med_ours, "hf_images_per_s": batch / med_theirs,
        "speed_ratio_mpp_over_hf": med_theirs / med_ours,
        "loss_mpp": loss_ours, "loss_hf": loss_theirs, "loss_abs_diff": abs(loss_ours - loss_theirs),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny case only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/pretrain_step.json")
    args = parser.parse_args()
    cases = {"tiny_fmnist_28px": CASES["tiny_fmnist_28px"]} if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    rows = [run_case(name, *spec, repeats=repeats) for name, spec in cases.items()]
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "mpp": mpp.__version__,
           "device": "cpu", "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    print(f"env: {env}")
    print("| case | batch | mpp img/s | HF img/s | mpp / HF speed | loss diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['mpp_images_per_s']:.1f} | {r['hf_images_per_s']:.1f} | "
              f"{r['speed_ratio_mpp_over_hf']:.2f}x | {r['loss_abs_diff']:.1e} |")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
