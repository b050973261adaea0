"""Packaged recipes: found by name, listed by `mpp recipes`, the repo-root folder the same files."""

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
