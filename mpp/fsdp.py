"""Fully sharded pretraining (``fsdp=true``): PyTorch's FSDP2 ``fully_shard`` on every transformer block.

With N processes each one holds 1/N of every block's weights, gradients and AdamW moments, and gathers a block's
full weights only while it runs: what ViT-L/H (and larger batches) need when a replica with its optimiser state does
not fit one accelerator. The update is the data-parallel one (gradients averaged over processes), so an FSDP run
follows the plain multi-process run to float tolerance (tested on CPU with 2 processes).

mpp applies ``fully_shard`` itself instead of going through accelerate's FSDP plugin: the plugin only engages on GPUs,
while ``fully_shard`` also runs on the CPU with gloo, so the same code path is tested here. Accelerate still runs the
processes, precision (autocast) and the optimizer wrapper; the model is not passed to ``accelerator.prepare``.

Checkpoints stay in mpp's format (``model.safetensors`` + ``optimizer.pt``): every process takes part in gathering
the full state, which the main process writes (optimizer moments keyed by parameter name, not index). Resuming loads
the full state and shards it again, on any number of processes. The main process keeps a plain (unsharded) copy of
the model, refreshed from the shards when needed, for the kNN monitor, reconstruction pictures and the exported
weights: those run on one process, and a sharded forward would wait for the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard each encoder and decoder block, then the rest (embeddings, norms, heads) as one unit; in place."""
    model.to(device)
    for block in [*getattr(model, "blocks", []), *getattr(model, "decoder_blocks", [])]:
        fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU of the main process (empty elsewhere). Every process must call it."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state (keyed by parameter name) on the main process. Every process must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a full optimizer state (as :func:`full_optimizer_state` gave it) into a sharded model's optimizer."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


class PlainCopy:
    """A plain copy of a sharded model on the main process, for what runs on one process only.

    Args:
        sharded: the sharded model (``None``: not sharded, :meth:`sync` returns ``plain`` unchanged).
        plain: an unsharded model of the same architecture (on the main process; ``None`` elsewhere).
    """

    def __init__(self, sharded: torch.nn.Module | None, plain: torch.nn.Module | None) -> None:
        self.sharded = sharded
        self.plain = plain

    def sync(self) -> Any:
        """The plain model holding the current weights (``None`` off the main process). Every process calls it."""
        if self.sharded is not None:
            state = full_model_state(self.sharded)
            if self.plain is not None:
                self.plain.load_state_dict(state)
        return self.plain
