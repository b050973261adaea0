"""A tiny pretraining run the pretraining, streaming and FSDP tests share (micro model, synthetic data, CPU)."""

from pathlib import Path

import torch

from mpp.config import PretrainConfig, build_config
from mpp.train.checkpoint import latest_checkpoint, read_checkpoint

TINY = [
    "model.name=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3", "mixed_precision=fp32",
    "progress=false", "log_every=1", "viz_samples=4",
]  # fmt: skip


def tiny_config(out: Path, *extra: str) -> PretrainConfig:
    return build_config(PretrainConfig, None, [*TINY, f"output_dir={out}", *extra])


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    found = read_checkpoint(path)
    return found.model_state, found.optimizer_state, found.trainer_state


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]
