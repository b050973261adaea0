"""Fully sharded pretraining (``fsdp=true``): PyTorch's FSDP2 ``fully_shard`` on every transformer block.

With N processes each one holds 1/N of every block's weights, gradients and AdamW moments, and gathers a block's
full weights only while it runs: what ViT-L/H (and larger batches) need when a replica with its optimiser state does
not fit one accelerator. The update is the data-parallel one (gradients averaged over processes), so an FSDP run
follows the plain multi-process run to float tolerance (tested on CPU with 2 processes).

mpp applies ``fully_shard`` itself instead of going through accelerate's FSDP plugin: the plugin only engages on GPUs,
while ``fully_shard`` also runs on the CPU with gloo, so the same code path is tested here. Accelerate still runs the
processes, precision (autocast) and the optimizer wrapper; the model is not passed to ``accelerator.prepare``.

Checkpoints are sharded: every process writes its own shards of the weights and AdamW state with PyTorch's
distributed checkpoint (``step_*/sharded/``, plus ``state.json``), so no process ever holds the whole state; the
directory is written under a hidden name and renamed into place by the main process once every shard is down, like
every mpp checkpoint. Resuming loads the shards into the freshly sharded model (any process count: the distributed
checkpoint reshards on load). The main process keeps a plain (unsharded) copy of the model, refreshed from the
shards when needed, for the kNN monitor, reconstruction pictures and the exported weights: those run on one process,
and a sharded forward would wait for the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from mpp.train.checkpoint import SHARDED, publish_checkpoint, reserve_checkpoint

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


def save_sharded(
    accelerator: Accelerator,
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path | None:
    """Write checkpoint ``state["step"]`` as shards from every process; its path on the main process.

    Every process must call it. The main process reserves the hidden directory and, after all shards are written,
    publishes it (``state.json``, rename, ``latest``, pruning) as :func:`mpp.train.checkpoint.save_checkpoint` does.
    """
    main = accelerator.is_main_process
    tmp = [str(reserve_checkpoint(run_dir, state["step"])) if main else None]
    torch.distributed.broadcast_object_list(tmp, src=0)
    directory = Path(tmp[0])  # type: ignore[arg-type]
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    model_state, optim_state = get_state_dict(model, inner)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / SHARDED))
    accelerator.wait_for_everyone()  # every shard is down before the directory is published
    path = publish_checkpoint(run_dir, directory, lambda _: None, state, keep) if main else None
    accelerator.wait_for_everyone()
    return path


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load a :func:`save_sharded` checkpoint into a sharded model and its optimizer (every process calls it)."""
    model_state, optim_state = get_state_dict(model, optimizer)  # also creates the AdamW moments to load into
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


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
