"""Parameter budgets: what a Lily adapter or a LoRA adapter would cost on a model, and the Lily rank that fits a budget.

    cfg = lily.fit_budget(model, ["q_proj", "v_proj"], like_lora_rank=8)   # Lily at LoRA r=8's budget
    model = lily.inject(model, cfg)

Nothing here touches the model: counts come from the same plan `inject` follows.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lily.config import MAX_RANK, LilyConfig
from lily.errors import ConfigError
from lily.inject import resolve_routing
from lily.plan import plan_targets
from lily.report import type_sizes

BUDGET_SHAPE = {"num_A": 2, "num_B": 2}
"""The A groups and experts `fit_budget` uses unless told otherwise: the "high r, few A and B" corner, which spends
the budget on rank rather than on more groups and experts (see README "When to choose Lily")."""


def lily_parameters(model: nn.Module, config: LilyConfig) -> int:
    """How many parameters `lily.inject(model, config)` would add (A groups, B experts, routers)."""
    routing, _ = resolve_routing(model, config)
    return sum(sum(type_sizes(t, config.num_B, routing)) for t in plan_targets(model, config))


def lora_parameters_per_rank(model: nn.Module, config: LilyConfig) -> int:
    """LoRA's cost of one rank on the layers `config` adapts: sum of fan_in + d_out (a conv's A is a k x k kernel)."""
    plan = plan_targets(model, config)
    return sum(t.num_layers * (t.fan_in + t.out_features) for t in plan if t.placement == "layer")


def matched_lora_rank(budget: int, per_rank: int) -> int:
    """The LoRA rank whose parameter count r * per_rank is closest to `budget` (at least 1)."""
    return max(1, round(budget / per_rank))


def fit_budget(
    model: nn.Module,
    target_modules: list[str] | str,
    budget: int | None = None,
    like_lora_rank: int | None = None,
    **fields: Any,
) -> LilyConfig:
    """The `LilyConfig` with the largest rank r whose adapter costs at most `budget` parameters on `model`, or at most
    what LoRA of rank `like_lora_rank` costs on the same layers (give one of the two).

    `fields` are other `LilyConfig` fields (num_A, num_B, routing, scaling, ...); num_A and num_B default to
    `BUDGET_SHAPE`. A budget too small for r=1 is a ConfigError naming the smallest that fits.

    Example:
        >>> cfg = lily.fit_budget(model, ["query", "value"], like_lora_rank=8)
    """
    if (budget is None) == (like_lora_rank is None):
        raise ConfigError("fit_budget: give a parameter budget or like_lora_rank (one of the two).")
    if "r" in fields:
        raise ConfigError("fit_budget chooses r itself; leave it out (set num_A, num_B and the other fields).")
    if "layers_per_A" not in fields:
        fields.setdefault("num_A", BUDGET_SHAPE["num_A"])
    fields.setdefault("num_B", BUDGET_SHAPE["num_B"])

    def config(r: int) -> LilyConfig:  # built afresh: parallel_r follows r unless given
        return LilyConfig(target_modules=target_modules, r=r, **fields)

    one = config(1)
    if like_lora_rank is not None:
        if isinstance(like_lora_rank, bool) or not isinstance(like_lora_rank, int) or like_lora_rank < 1:
            raise ConfigError(f"fit_budget: like_lora_rank must be an integer >= 1, got {like_lora_rank!r}.")
        budget = like_lora_rank * lora_parameters_per_rank(model, one)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"fit_budget: budget must be a whole number of parameters >= 1, got {budget!r}.")
    at_one = lily_parameters(model, one)
    per_rank = lily_parameters(model, config(2)) - at_one  # the count is linear in r
    if at_one > budget:
        raise ConfigError(
            f"fit_budget: a budget of {budget:,} parameters is below Lily's smallest adapter here ({at_one:,} at r=1 "
            f"with num_A={one.num_A}, num_B={one.num_B}); raise it or use fewer A groups and experts."
        )
    r = min(MAX_RANK, 1 + (budget - at_one) // per_rank)
    return config(r)
