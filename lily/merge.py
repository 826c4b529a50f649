"""Fold input-independent Lily updates into the base weights, and take them out again."""

from __future__ import annotations

from torch import nn

from lily.adapter import get_adapter, get_adapters, lily_layers
from lily.errors import MergeError


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter's s * B~ A into its weights ("static"/"uniform" routing only); returns `model`.

    Afterwards the adapted layers cost exactly the base layers. Data-dependent routing raises MergeError.
    """
    adapters = get_adapters(model)
    if adapters.disabled:
        raise MergeError("adapters are disabled (inside lily.disable_adapters); merge after the block.")
    get_adapter(model).require_mergeable()
    for _, layer in lily_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract exactly what it added; returns `model`."""
    get_adapters(model)
    for _, layer in lily_layers(model):
        layer.unmerge()
    return model
