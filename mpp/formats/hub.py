"""The Hugging Face Hub: ``hf://owner/name[@revision]`` as an encoder to start from, and ``mpp push`` to share one.

Downloads go through ``huggingface_hub.snapshot_download`` into its cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``
reads that cache only). Only safetensors weights and JSON configs are fetched unless pickles are asked for
(``hub_pickles=true``): a pickle can run code when loaded by anything less careful than mpp's ``weights_only`` reader.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PREFIX = "hf://"
SAFE_PATTERNS = ["*.safetensors", "*.json"]
PICKLE_PATTERNS = ["*.pth", "*.pt", "*.bin"]
WEIGHTS = ("*.safetensors", "*.pth", "*.pt", "*.bin")


class HubError(ValueError):
    """The Hub could not give (or take) what was asked; one line."""


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf://owner/name@rev`` -> ``("owner/name", "rev")`` (revision ``None``: the default branch).

    Raises:
        HubError: not of that form.
    """
    body = ref[len(PREFIX) :]
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{ref!r} is not a Hub reference; write hf://owner/name or hf://owner/name@revision")
    return repo, revision or None


def resolve_init(init: str | None, pickles: bool = False) -> str | None:
    """A local path for ``init``: an ``hf://`` reference is downloaded (or found in the cache); others pass through.

    Raises:
        HubError: the repository, revision or files cannot be had (offline without them in the cache, not found).
    """
    if not init or not init.startswith(PREFIX):
        return init
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parse_hub_ref(init)
    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if pickles else [])
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=patterns, local_files_only=bool(constants.HF_HUB_OFFLINE)
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"init {init!r}: cannot get it from the Hugging Face Hub ({why})") from None
    if not any(any(Path(folder).rglob(p)) for p in WEIGHTS):
        hint = "" if pickles else "; it may hold pickles only: hub_pickles=true fetches those"
        raise HubError(
            f"init {init!r}: no weights fetched from the Hub (safetensors{', pickles' if pickles else ''}){hint}"
        )
    return folder


def check_folder(folder: Path) -> None:
    """A folder fit to share: weights and a model card (``mpp convert RUN DIR`` writes both).

    Raises:
        HubError: it is missing, a pretraining run (convert it first), or lacks weights or README.md.
    """
    from mpp.formats.card import CARD, is_pretraining_run

    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory")
    if is_pretraining_run(folder):
        raise HubError(
            f"{folder} is a pretraining run: export it first, e.g. `mpp convert {folder} {folder}/hub --to hf` "
            f"(writes the model card), then `mpp push {folder}/hub OWNER/NAME`"
        )
    if not any(any(folder.glob(p)) for p in WEIGHTS):
        raise HubError(f"{folder} holds no weights (*.safetensors, *.pth, *.bin)")
    if not (folder / CARD).is_file():
        raise HubError(f"{folder} has no {CARD} model card: `mpp convert RUN {folder}` writes one from a run")


def push_folder(folder: str | Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Create ``repo_id`` on the Hub (if new) and upload ``folder`` to it; returns the commit's URL.

    ``api`` is a ``huggingface_hub.HfApi`` (default: a new one, with the token of ``huggingface-cli login`` or
    ``HF_TOKEN``).
    """
    folder = Path(folder)
    check_folder(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with mpp push")
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp push``."""
    parser = argparse.ArgumentParser(
        prog="mpp push",
        description="Upload an exported folder (weights + README.md model card) to the Hugging Face Hub.",
        epilog="example: mpp convert runs/fm hub/ --to hf && mpp push hub/ me/mae-fmnist-tiny",
    )
    parser.add_argument("folder", help="what `mpp convert RUN DIR` wrote")
    parser.add_argument("repo_id", help="OWNER/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    try:
        url = push_folder(args.folder, args.repo_id, args.private)
    except HubError as err:
        print(f"mpp push: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the Hub's own errors (auth, network): one line, not a traceback
        print(f"mpp push: error: {type(err).__name__}: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} -> {url}")
    return 0
