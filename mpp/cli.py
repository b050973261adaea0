"""The ``mpp`` console script: one sub-command per stage, each a thin ``main(argv)``."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {  # name: (module with main(argv), help)
    "pretrain": ("mpp.train.pretrain", "MAE pretraining on a dataset or folder (CPU, one or many GPUs); resumable"),
    "shard": ("mpp.data.shards", "pack an image folder into tar shards + index (starts in seconds at any size)"),
    "convert": ("mpp.formats.convert", "convert weights between mpp, official MAE, timm and Hugging Face formats"),
    "push": ("mpp.formats.hub", "upload an exported folder (weights + model card) to the Hugging Face Hub"),
    "knn": ("mpp.eval.knn", "weighted cosine kNN accuracy of a frozen encoder (optionally with few labels)"),
    "probe": (
        "mpp.eval.probe",
        "linear probe (BN + linear, LARS) of a frozen encoder; full, or cached with an lr sweep",
    ),
    "finetune": ("mpp.eval.finetune", "full fine-tuning (layer decay, mixup/cutmix, RandAugment), or from scratch"),
    "evaluate": ("mpp.eval.evaluate", "kNN + probe (+ fine-tune) of a run: results.json/.md, confusion plots"),
    "recipes": ("mpp.recipes", "list the packaged recipes (--recipe NAME uses one) with their one-line summaries"),
    "visualize": ("mpp.viz.visualize", "reconstructions, attention, position tables, PCA of an encoder: index.html"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: mpp COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`mpp COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its stage's ``main``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mpp: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        code = int(module.main(rest) or 0)
        sys.stdout.flush()  # inside the try: a pipe closed early shows up at the last flush too
    except BrokenPipeError:
        # The reader stopped listening (`mpp recipes | head -1`, `| grep -q`): end quietly as Unix tools do. Python
        # flushes stdout again at exit, so point it at /dev/null first or that flush prints the traceback instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a tool killed by the closed pipe
    return code


if __name__ == "__main__":
    raise SystemExit(main())
