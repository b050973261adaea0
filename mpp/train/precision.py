"""``mixed_precision=auto`` on CPUs: bf16 only where the CPU has native bf16 *and* a short trial shows it faster.

On CPUs with AMX or AVX-512 BF16, bf16 autocast makes the matmuls faster (5x with AMX, 1.1-1.3x with AVX-512 BF16,
measured); on CPUs without them (AVX2-only EPYCs) bf16 falls back to kernels ~25x slower. The flag alone does not settle
it (small models and small batches are bound by other work), so :func:`choose_cpu_precision` times a few forward +
backward passes of the run's own model on its own first batch, at the run's batch size, in each precision (interleaved,
after one untimed pass each) and keeps bf16 only when it is at least :data:`MIN_GAIN` faster. The batch size matters: on
an AVX-512 BF16 EPYC the ViT-T 32 px step gained 1.1-1.5x from bf16 at batch 256 but ~1.0x at 32. The choice and the
measured ratio are printed and recorded in config.yaml; a resumed run reads the recorded choice instead of timing again,
so it continues in the same precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_GAIN = 1.05  # bf16 must be this much faster per step to be worth its rounding
TRIAL_STEPS = 4  # timed steps of each precision, interleaved


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def decide(flags: set[str], fp32_s: float | None, bf16_s: float | None) -> tuple[str, str]:
    """``(precision, reason)`` from the CPU's flags and the trial's seconds per step (``None``: not timed)."""
    native = sorted(flags & set(BF16_FLAGS))
    if not native:
        return "no", "fp32: this CPU has no native bf16 (no amx_bf16 / avx512_bf16), where bf16 is many times slower"
    if fp32_s is None or bf16_s is None:
        return "no", "fp32: bf16 not timed"
    ratio = fp32_s / bf16_s
    if ratio >= MIN_GAIN:
        return "bf16", f"bf16: {', '.join(native)}, and the trial step ran {ratio:.2f}x faster than fp32"
    return "no", f"fp32: {', '.join(native)} present, but bf16 ran only {ratio:.2f}x fp32 in the trial"


def _one_step(step: Callable[[], torch.Tensor], bf16: bool) -> float:
    """Seconds for one ``step()`` (forward + backward) under CPU bf16 autocast or in fp32."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = step()
    loss.backward()
    return time.perf_counter() - start


def time_both(step: Callable[[], torch.Tensor], steps: int = TRIAL_STEPS) -> tuple[float, float]:
    """Median seconds per ``step()`` in fp32 and under bf16, after one untimed step of each.

    The two precisions alternate (fp32 first, then bf16 first, ...), so a neighbour's burst on a shared machine
    slows both alike; medians drop the odd slow step (single-step readings here vary by +-20%).
    """
    for bf16 in (False, True):  # untimed: first calls pay for allocation and kernel selection
        _one_step(step, bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps):
        for bf16 in (False, True) if i % 2 == 0 else (True, False):
            times[bf16].append(_one_step(step, bf16))
    return statistics.median(times[False]), statistics.median(times[True])


def choose_cpu_precision(
    model: torch.nn.Module, step: Callable[[], torch.Tensor], flags: set[str] | None = None
) -> tuple[str, str, float | None]:
    """Trial both precisions on ``step`` (the model's loss on a fixed batch); ``(precision, reason, ratio)``.

    The trial leaves the model's weights and every random generator as they were (no optimiser step; gradients are
    cleared; ``step`` must draw no random numbers).
    """
    flags = cpu_flags() if flags is None else flags
    if not flags & set(BF16_FLAGS):
        precision, reason = decide(flags, None, None)
        return precision, reason, None
    fp32, bf16 = time_both(step)
    model.zero_grad(set_to_none=True)
    precision, reason = decide(flags, fp32, bf16)
    return precision, reason, round(fp32 / bf16, 3)
