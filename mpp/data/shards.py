"""Image shards: a folder packed into a few large tar files plus one index, read without a per-file scan.

``mpp shard SRC OUT`` writes ``OUT/shard-00000.tar, ...`` (WebDataset-style: plain tar files whose members are the
original image files, named ``<index>.<ext>``, so ``tar -x`` or WebDataset can read them too) and ``OUT/index.json``
(class names, and for each shard its items' byte offset, size, label and original path). Opening a shard set reads
only ``index.json``: a 1M-image set starts training without touching an image file, where a folder opens every
file's header at start. Items are read by offset (random access), so the data order, augmentation and resume stay
exactly those of every other source: a sample is a function of (seed, epoch, index), and a checkpoint's position in
the epoch is enough to continue, on any number of processes.

Files that are not images with the requested channels are left out when the shards are written (their paths and
reasons in ``OUT/skipped_files.txt``), so reading needs no check.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpp.data.base import ImageDataset, skip_line
from mpp.data.folder import ImageFolder
from mpp.data.images import decode_bytes
from mpp.runtime import atomic_write_text

INDEX = "index.json"
FORMAT = "mpp.shards.v1"


def write_shards(
    src: str | Path, out: str | Path, shard_size: int = 10_000, in_chans: int = 3, split: str = "train"
) -> Path:
    """Pack the images of folder ``src`` (its ``split`` sub-folder if there is one) into tar shards in ``out``.

    Args:
        src: an image folder, one sub-folder per class (as :class:`~mpp.data.folder.ImageFolder`).
        out: the output directory (created); an existing shard set there is replaced.
        shard_size: images per shard.
        in_chans: the channels the images must give (files that cannot are left out, listed with their reason).
        split: the folder's split sub-folder to pack, when it has one.

    Returns:
        The path of ``index.json``.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    folder = ImageFolder(src, split, None, in_chans=in_chans)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    shards = []
    for start in range(0, len(folder.paths), shard_size):
        name = f"shard-{len(shards):05d}.tar"
        members = range(start, min(start + shard_size, len(folder.paths)))
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in members:
                path = folder.paths[index]
                info = tar.gettarinfo(str(path), arcname=f"{index:09d}{path.suffix.lower()}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
        with tarfile.open(out / name, "r") as tar:  # where each member's bytes start, as the tar module reads them
            offsets = [(m.offset_data, m.size) for m in tar.getmembers()]
        items = [
            [offset, size, folder.targets[index], folder.paths[index].relative_to(folder.root).as_posix()]
            for (offset, size), index in zip(offsets, members, strict=True)
        ]
        shards.append({"file": name, "items": items})
    index = {
        "format": FORMAT,
        "classes": folder.classes,
        "in_chans": in_chans,
        "source": str(folder.root),
        "shards": shards,
    }
    (out / "skipped_files.txt").write_text(
        "path\twhen\treason\n"
        + "".join(
            skip_line(item, folder.skip_reasons[item], folder.skip_when.get(item, "scan")) for item in folder.skipped
        )
    )
    atomic_write_text(out / INDEX, json.dumps(index) + "\n")  # last: a set is usable only once every shard is whole
    return out / INDEX


class TarShards(ImageDataset):
    """The images of a shard set written by :func:`write_shards`, read by byte offset; only the index is read at start.

    Args:
        root: the shard directory (``root/<split>`` when it holds its own ``index.json``).
        split: split name, used only when ``root/<split>`` exists.
        transform: applied to each converted image.
        in_chans: channels to convert to.

    Raises:
        FileNotFoundError: no ``index.json`` (one line naming the directory and how to make one).
        ValueError: the index is not an mpp shard index.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, transform: Callable[[Any], Any] | None = None, in_chans: int = 3
    ) -> None:
        super().__init__(transform, in_chans)
        base = Path(root).expanduser()
        self.root = base / split if (base / split / INDEX).is_file() else base
        self.name = f"shards {self.root}"
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root}: no {INDEX} (write shards with `mpp shard IMAGE_FOLDER {self.root}`)")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_path}: not valid JSON ({err})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: not an mpp shard index (format {FORMAT})")
        self.classes = index.get("classes")
        self.files: list[str] = [s["file"] for s in index["shards"]]
        self.items: list[tuple[int, int, int]] = []  # (shard, offset, size)
        self.names: list[str] = []
        for shard, entry in enumerate(index["shards"]):
            for offset, size, label, name in entry["items"]:
                self.items.append((shard, offset, size))
                self.targets.append(label)
                self.names.append(name)
        if not self.items:
            raise ValueError(f"{index_path}: the shard set holds no images")
        self._handles: dict[int, Any] = {}  # per process (each DataLoader worker opens its own)

    def describe(self, index: int) -> str:
        """The image's original path and its shard."""
        return f"{self.names[index]} in {self.root / self.files[self.items[index][0]]}"

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """Read the image's bytes at its offset and decode them."""
        shard, offset, size = self.items[index]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.root / self.files[shard], "rb")  # noqa: SIM115 (kept open)
        handle.seek(offset)
        return decode_bytes(handle.read(size), self.in_chans)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to worker processes
        return state


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpp shard``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="mpp shard", description="Pack an image folder into tar shards + index.")
    parser.add_argument("src", help="image folder (one sub-folder per class, or a train/ sub-folder of them)")
    parser.add_argument("out", help="output directory for shard-*.tar and index.json")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    parser.add_argument("--in-chans", type=int, default=3, help="channels the images must give (default 3)")
    parser.add_argument("--split", default="train", help="the folder's split sub-folder, when it has one")
    args = parser.parse_args(argv)
    try:
        index = write_shards(args.src, args.out, args.shard_size, args.in_chans, args.split)
    except (ValueError, OSError) as err:
        print(f"mpp shard: error: {err}", file=sys.stderr)
        return 2
    data = json.loads(index.read_text())
    count = sum(len(s["items"]) for s in data["shards"])
    print(f"wrote {count} images in {len(data['shards'])} shards to {index.parent}")
    return 0
