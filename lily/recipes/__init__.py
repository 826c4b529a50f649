"""The paper's experiments as `lily recipe <name>`: each recipe is a set of `lily train` defaults.

A recipe's values sit between the `TrainConfig` defaults and the user's YAML file and flags, so any of
them can be overridden: `lily recipe vtab --model PATH --data PATH --epochs 10`.
"""

from __future__ import annotations

from typing import Any

from lily.recipes import vtab

RECIPES: dict[str, dict[str, Any]] = {"vtab": vtab.DEFAULTS}
DESCRIPTIONS = {"vtab": vtab.__doc__.strip().splitlines()[0]}
