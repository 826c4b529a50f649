"""The paper's experiments as `lily recipe <name>`: each recipe is a set of `lily train` defaults.

A recipe's values sit between the `TrainConfig` defaults and the user's YAML file and flags, so any of
them can be overridden: `lily recipe vtab --model PATH --data PATH --epochs 10`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

NAMES = ("vtab",)


def recipe_module(name: str) -> ModuleType:
    return importlib.import_module(f"lily.recipes.{name}")


def defaults(name: str) -> dict[str, Any]:
    """The `lily train` options of recipe `name`."""
    return recipe_module(name).DEFAULTS


def description(name: str) -> str:
    """The first line of the recipe module's docstring."""
    return (recipe_module(name).__doc__ or name).strip().splitlines()[0]
