"""Does ``torch.compile`` pay for itself in a pretraining run? Eager against compiled on the same MAE step.

For each case: the time of the first compiled step (compilation included, what a run pays once), the median eager
and compiled steps (forward + backward + AdamW, interleaved after warm-up so machine noise hits both alike), their
ratio, the loss of each on the same batch and mask (they must agree), and the break-even: how many steps (and how many
minutes of eager training) a run must last before the compiled one is ahead. ``maybe_compile`` in
:mod:`mpp.train.pretrain` keeps compile off by default on CPUs from these figures (docs/benchmarks.md has them).

    .venv/bin/python benchmarks/bench_compile.py [--cases tiny_fmnist_28px,vit_base_224px] [--backend inductor]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_pretrain_step import CASES, pick_cases, step_mpp
from machine import publish

import mpp

DEFAULT_CASES = ("tiny_fmnist_28px", "vit_base_224px")


def one_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, imgs: torch.Tensor, precision: str
) -> tuple[float, float]:
    """Seconds for one forward + backward + optimiser step, and the step's loss."""
    sync = torch.cuda.synchronize if imgs.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = step_mpp(model, imgs, torch.tensor(1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start, loss.item()


def run_case(name: str, repeats: int, backend: str, precision: str, device: torch.device) -> dict:
    """Eager and compiled timings of one case (see the module docstring)."""
    variant, overrides, batch = CASES[name]
    torch.manual_seed(0)
    model = mpp.create_model(variant, norm_pix_loss=True, **overrides).to(device)
    imgs = torch.randn(batch, model.in_chans, *model.img_size, device=device)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        loss_eager = step_mpp(model, imgs, torch.tensor(1)).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    # the first compiled step compiles the forward and the backward; its loss is on the same weights as loss_eager
    first_compiled_s, loss_compiled = one_step(compiled, opt, imgs, precision)
    for _ in range(2):  # warm-up of both
        one_step(model, opt, imgs, precision)
        one_step(compiled, opt, imgs, precision)
    eager, fast = [], []
    for r in range(repeats):  # interleaved, alternating which goes first
        pair = [(eager, model), (fast, compiled)]
        for times, m in pair if r % 2 == 0 else pair[::-1]:
            times.append(one_step(m, opt, imgs, precision)[0])
    eager_s, compiled_s = statistics.median(eager), statistics.median(fast)
    saved = eager_s - compiled_s
    overhead_s = first_compiled_s - compiled_s  # what the first step costs beyond an ordinary compiled step
    break_even = overhead_s / saved if saved > 0 else None
    return {
        "case": name, "variant": variant, "batch": batch, "repeats": repeats, "backend": backend,
        "precision": precision, "first_compiled_step_s": first_compiled_s, "compile_overhead_s": overhead_s,
        "eager_step_s": eager_s, "compiled_step_s": compiled_s, "speedup": eager_s / compiled_s,
        "break_even_steps": break_even,
        "break_even_eager_minutes": None if break_even is None else break_even * eager_s / 60,
        "loss_eager": loss_eager, "loss_compiled": loss_compiled,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md."""
    head = "| case | batch | precision | eager step | compiled step | speedup | compile overhead | break-even |"
    lines = [head, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        even = "never" if r["break_even_steps"] is None else (
            f"{r['break_even_steps']:.0f} steps ({r['break_even_eager_minutes']:.1f} min)")  # fmt: skip
        lines.append(f"| {r['case']} | {r['batch']} | {r['precision']} | {r['eager_step_s'] * 1000:.0f} ms | "
                     f"{r['compiled_step_s'] * 1000:.0f} ms | **{r['speedup']:.2f}x** | "
                     f"{r['compile_overhead_s']:.0f} s | {even} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure the cases, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [run_case(n, args.repeats, args.backend, args.precision, device) for n in pick_cases(args.cases)]
    publish(args.out, rows, table(rows), mpp=mpp.__version__, device=args.device)


if __name__ == "__main__":
    main()
