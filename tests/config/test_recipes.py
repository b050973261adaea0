"""Packaged recipes: found by name, listed by `mpp recipes`, the repo-root folder the same files."""

import sys
from pathlib import Path

from mpp.cli import main as cli_main
from mpp.config import PretrainConfig, build_config
from mpp.recipes import RECIPES


def test_a_packaged_recipe_by_name_and_the_listing(capsys):
    by_name = build_config(PretrainConfig, "fmnist_demo")
    by_path = build_config(PretrainConfig, "recipes/fmnist_demo.yaml")
    assert by_name == by_path and by_name.optim.epochs == 5  # include: between packaged recipes works too
    assert cli_main(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(list(RECIPES.glob("*.yaml"))) and any(x.startswith("fmnist_tiny ") for x in listed)
    assert Path("recipes").resolve() == RECIPES


class _ClosedPipe:
    """stdout whose reader has gone (`mpp recipes | grep -q ...` after the match)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


def test_a_listing_into_a_closed_pipe_ends_quietly(monkeypatch, tmp_path, capsys):
    with open(tmp_path / "stdout", "w") as stand_in:  # its descriptor is the one pointed at /dev/null
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(stand_in.fileno()))
        assert cli_main(["recipes"]) == 141  # 128 + SIGPIPE, no traceback
