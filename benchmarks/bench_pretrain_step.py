"""Pretraining step speed: mpp's MAE against the official MAE code and Hugging Face's ViTMAEForPreTraining.

All three hold the same weights (every tensor copied from mpp, position tables included), see the same batch and the
same mask, and are timed on forward + backward + AdamW step, interleaved so machine noise hits all alike. Reports the
median step, images/s, the speed ratios and the loss of each on the timed batch (they must agree).

The official code is not vendored: ``--official DIR`` points at a checkout of facebookresearch/mae. Its
``models_mae.py`` and ``util/pos_embed.py`` are loaded with two textual fixes for current libraries (printed when
applied): ``qk_scale=None, `` removed from the ``Block`` calls (timm dropped the argument) and ``np.float`` read as
``np.float64`` (numpy removed the alias). Without ``--official`` that column is skipped with a note. The official
``patchify`` hard-codes 3 channels, so its column is n/a on 1-channel cases.

On CUDA the step runs under bf16 autocast (the GPU default); on the CPU in fp32, plus a column ``mpp auto``: mpp at the
precision ``mixed_precision=auto`` picks on this CPU (its trial on the case's batch, as ``mpp pretrain`` runs it), so
the speed a user gets by default is set against the official code in fp32 at the same batch.

    .venv/bin/python benchmarks/bench_pretrain_step.py [--official ~/src/mae] [--cases vit_tiny_32px,vit_base_224px]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from machine import publish

import mpp
from mpp.formats.hf import hf_config_kwargs, mpp_to_hf
from mpp.train.precision import choose_cpu_precision

CASES = {
    # name: (variant, overrides, batch)
    "micro_16px": ("mae_vit_micro_patch4", {"img_size": 16, "in_chans": 3}, 8),  # for the test of this script
    "tiny_fmnist_28px": ("mae_vit_tiny_patch4", {}, 128),
    "tiny_fmnist_28px_p7": ("mae_vit_tiny_patch4", {"patch_size": 7}, 128),  # recipes/fmnist_tiny.yaml's 4x4 grid
    "vit_tiny_32px": ("mae_vit_tiny_patch4", {"img_size": 32, "in_chans": 3}, 256),
    "vit_base_224px": ("mae_vit_base_patch16", {}, 8),
    "vit_base_224px_b256": ("mae_vit_base_patch16", {}, 256),  # the GPU case (bf16 on CUDA)
}
DEFAULT_CASES = ("tiny_fmnist_28px", "vit_tiny_32px", "vit_base_224px")
# The two textual fixes the official code needs on current timm and numpy (file, old, new).
OFFICIAL_FIXES = (
    ("models_mae.py", "qk_scale=None, ", ""),
    ("util/pos_embed.py", "dtype=np.float)", "dtype=np.float64)"),
)

Step = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def load_official(directory: Path) -> types.ModuleType:
    """facebookresearch/mae's ``models_mae`` module from a checkout, with :data:`OFFICIAL_FIXES` applied in memory."""
    sources = {}
    for rel, old, new in OFFICIAL_FIXES:
        path = directory / rel
        if not path.is_file():
            raise SystemExit(f"--official {directory}: {rel} not found (expected a facebookresearch/mae checkout)")
        text = sources.get(rel, path.read_text())
        if old in text:
            print(f"official code: {rel}: replaced {old!r} with {new!r}")
        sources[rel] = text.replace(old, new)
    util = types.ModuleType("util")
    util.__path__ = []  # a package, so `from util.pos_embed import ...` resolves to the module below
    pos_embed = types.ModuleType("util.pos_embed")
    exec(compile(sources["util/pos_embed.py"], str(directory / "util/pos_embed.py"), "exec"), pos_embed.__dict__)
    saved = {name: sys.modules.get(name) for name in ("util", "util.pos_embed")}
    sys.modules.update({"util": util, "util.pos_embed": pos_embed})
    try:
        spec = importlib.util.spec_from_loader("official_models_mae", loader=None)
        module = importlib.util.module_from_spec(spec)
        exec(compile(sources["models_mae.py"], str(directory / "models_mae.py"), "exec"), module.__dict__)
    finally:
        for name, old_module in saved.items():
            if old_module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old_module
    return module


def build_official(module: types.ModuleType, ours: torch.nn.Module) -> torch.nn.Module:
    """The official ``MaskedAutoencoderViT`` of ``ours``'s shape, holding ``ours``'s weights (names are the same)."""
    dec = ours.decoder_blocks[0]
    theirs = module.MaskedAutoencoderViT(
        img_size=ours.img_size[0], patch_size=ours.patch_size, in_chans=ours.in_chans, embed_dim=ours.embed_dim,
        depth=len(ours.blocks), num_heads=ours.blocks[0].attn.num_heads, decoder_embed_dim=ours.decoder_embed_dim,
        decoder_depth=len(ours.decoder_blocks), decoder_num_heads=dec.attn.num_heads,
        mlp_ratio=ours.blocks[0].mlp.fc1.out_features / ours.embed_dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=ours.norm_pix_loss,
    )  # fmt: skip
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


def build_hf(ours: torch.nn.Module) -> torch.nn.Module:
    config = transformers.ViTMAEConfig(**hf_config_kwargs(ours), hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)  # fmt: skip
    theirs = transformers.ViTMAEForPreTraining(config)
    theirs.load_state_dict(mpp_to_hf(ours.state_dict()))  # all tensors, position tables included
    return theirs


# Each call draws its mask noise from the same seed: the official model draws `torch.rand(N, L)` itself, first thing
# in its forward that uses the generator, so seeding before the call hands all three the same mask.
def step_mpp(m: torch.nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(int(seed))
    return m(x, noise=torch.rand(x.shape[0], m.num_patches, device=x.device)).loss


def step_official(m: torch.nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(int(seed))
    return m(x, mask_ratio=0.75)[0]


def make_step_hf(num_patches: int) -> Step:
    def step_hf(m: torch.nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(int(seed))
        return m(pixel_values=x, noise=torch.rand(x.shape[0], num_patches, device=x.device)).loss

    return step_hf


def time_steps(model: torch.nn.Module, imgs: torch.Tensor, call: Step, repeats: int, autocast: bool) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    sync = torch.cuda.synchronize if imgs.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        ctx = torch.autocast(imgs.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = call(model, imgs, torch.tensor(1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return times


def run_case(name: str, variant: str, overrides: dict, batch: int, repeats: int, official: types.ModuleType | None,
             device: torch.device, compiled: bool = False) -> dict:  # fmt: skip
    torch.manual_seed(0)
    ours = mpp.create_model(variant, norm_pix_loss=True, **overrides)
    models: dict[str, tuple[torch.nn.Module, Step]] = {"mpp": (ours, step_mpp)}
    notes = []
    if official is None:
        notes.append("official: skipped (no --official DIR)")
    elif ours.in_chans != 3:
        notes.append("official: n/a (its patchify hard-codes 3 channels)")
    else:
        models["official"] = (build_official(official, ours), step_official)
    models["hf"] = (build_hf(ours), make_step_hf(ours.num_patches))
    models = {k: (m.to(device), call) for k, (m, call) in models.items()}
    imgs = torch.randn(batch, ours.in_chans, *ours.img_size, device=device)
    autocast = dict.fromkeys(models, device.type == "cuda")
    auto = None
    if device.type == "cpu":
        auto = auto_precision(ours, imgs)
        notes.append(f"mpp auto: {auto['reason']}")
        if auto["precision"] == "bf16":
            models["mpp auto"] = (copy.deepcopy(ours), step_mpp)
            autocast["mpp auto"] = True
        if compiled:  # `auto` plus compile=true: the most a user can switch on here (the warm-up below compiles it)
            models["mpp auto compiled"] = (torch.compile(copy.deepcopy(ours)), step_mpp)
            autocast["mpp auto compiled"] = auto["precision"] == "bf16"
    losses = {}
    for k, (m, call) in models.items():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast[k]):
            losses[k] = call(m, imgs, torch.tensor(1)).item()
    for k, (m, call) in models.items():  # warm-up
        time_steps(m, imgs, call, 2, autocast[k])
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(repeats):  # interleaved, and each implementation takes each place in the order in turn
        for k in names[r % len(names) :] + names[: r % len(names)]:
            m, call = models[k]
            times[k] += time_steps(m, imgs, call, 1, autocast[k])
    median = {k: statistics.median(t) for k, t in times.items()}
    if auto is not None and "mpp auto" not in median:  # auto kept fp32: the mpp column is what it runs
        median["mpp auto"], losses["mpp auto"] = median["mpp"], losses["mpp"]
    same_precision = [k for k in losses if not k.startswith("mpp auto")]  # bf16 rounds: its loss is compared on its own
    return {
        "case": name, "variant": variant, "overrides": overrides, "batch": batch, "repeats": repeats,
        "precision": "bf16" if device.type == "cuda" else "fp32", "notes": notes, "auto": auto,
        "step_s": median, "images_per_s": {k: batch / t for k, t in median.items()},
        "speed_mpp_over": {k: median[k] / median["mpp"] for k in median if k != "mpp"},
        "loss": losses, "loss_max_abs_diff": max(abs(losses[k] - losses["mpp"]) for k in same_precision),
    }  # fmt: skip


def auto_precision(model: torch.nn.Module, imgs: torch.Tensor) -> dict:
    """What ``mixed_precision=auto`` picks for ``model`` on this CPU, by the trial ``mpp pretrain`` runs (its batch)."""
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0))
    precision, reason, ratio = choose_cpu_precision(model, lambda: model(imgs, noise=noise).loss)
    return {"precision": "bf16" if precision == "bf16" else "fp32", "reason": reason, "trial_ratio": ratio}


def pick_cases(spec: str) -> list[str]:
    """The case names of a comma-separated ``--cases``; an unknown one stops with the list of known ones."""
    names = spec.split(",")
    if unknown := [n for n in names if n not in CASES]:
        raise SystemExit(f"--cases: unknown {unknown}; known: {sorted(CASES)}")
    return names


def table(rows: list[dict]) -> str:
    head = ("| case | batch | precision | mpp img/s | official img/s | HF img/s | mpp / official | mpp / HF "
            "| loss diff | mpp auto | auto img/s | auto / official fp32")  # fmt: skip
    lines = [head + " |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        ips, step = r["images_per_s"], r["step_s"]
        off = f"{ips['official']:.1f}" if "official" in ips else "n/a"
        off_ratio = f"**{step['official'] / step['mpp']:.2f}x**" if "official" in step else "n/a"
        auto = ["-", "-", "-"]
        if "mpp auto" in step:
            vs_official = f"**{step['official'] / step['mpp auto']:.2f}x**" if "official" in step else "n/a"
            auto = [r["auto"]["precision"], f"{ips['mpp auto']:.1f}", vs_official]
        if "mpp auto compiled" in step and "official" in step:
            auto[2] += f" ({step['official'] / step['mpp auto compiled']:.2f}x compiled)"
        lines.append(f"| {r['case']} | {r['batch']} | {r['precision']} | {ips['mpp']:.1f} | {off} | {ips['hf']:.1f} | "
                     f"{off_ratio} | {step['hf'] / step['mpp']:.2f}x | {r['loss_max_abs_diff']:.1e} | "
                     f"{' | '.join(auto)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="a checkout of facebookresearch/mae (column skipped without)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny cases only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/pretrain_step.json")
    parser.add_argument("--compile", action="store_true", help="also time mpp at `auto` under torch.compile (CPU)")
    args = parser.parse_args(argv)
    names = pick_cases(args.cases) if not args.quick else ["tiny_fmnist_28px", "vit_tiny_32px"]
    official = load_official(args.official.expanduser()) if args.official else None
    if official is None:
        print("note: no --official DIR given: the official MAE column is skipped")
    repeats = 3 if args.quick else args.repeats
    device = torch.device(args.device)
    rows = [
        run_case(n, *CASES[n], repeats=repeats, official=official, device=device, compiled=args.compile) for n in names
    ]
    publish(args.out, rows, table(rows), transformers=transformers.__version__, mpp=mpp.__version__, device=args.device)


if __name__ == "__main__":
    main()
