"""Training: the engine under every stage (fit, checkpoints, optimisers, FSDP) and the ``mpp pretrain`` command."""
