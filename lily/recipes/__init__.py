"""The paper's experiments as `lily recipe <name>`: each recipe is a set of `lily train` defaults.

A recipe's values sit between the `TrainConfig` defaults and the user's YAML file and flags, so any of
them can be overridden: `lily recipe vtab --model PATH --data PATH --epochs 10`. Each module below holds
the recipes of one experiment in `RECIPES` (name -> options) and documents the paper's settings. A module
whose experiment is no `lily train` task (DreamBooth trains a diffusers UNet) has its own flags and loop in
`run_recipe(argv)`, which `lily recipe <name>` hands its arguments to.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

MODULES = ("vtab", "glue", "commonsense", "mamba", "dreambooth")
"""One module per experiment; a recipe's name starts with its module's name (`glue-rte` is in `glue`)."""


def names() -> list[str]:
    """Every recipe, in the order of MODULES."""
    return [name for module in MODULES for name in recipe_module(module).RECIPES]


def recipe_module(name: str) -> ModuleType:
    """The module that holds recipe `name`."""
    return importlib.import_module(f"lily.recipes.{name.split('-')[0]}")


def defaults(name: str) -> dict[str, Any]:
    """The options of recipe `name`: `lily train` options, or its own for a recipe with `run_recipe`."""
    return recipe_module(name).RECIPES[name]


def description(name: str) -> str:
    """The module's line for the recipe (`DESCRIPTIONS`), else the first line of its docstring."""
    module = recipe_module(name)
    return getattr(module, "DESCRIPTIONS", {}).get(name) or (module.__doc__ or name).strip().splitlines()[0]


def own_command(name: str) -> Callable[[list[str]], int] | None:
    """`run_recipe(argv)` of a recipe with its own flags and training loop, else None (a `lily train` recipe, or no
    recipe at all)."""
    return getattr(recipe_module(name), "run_recipe", None) if name in names() else None
