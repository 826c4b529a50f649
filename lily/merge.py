"""Fold input-independent Lily updates into the base weights, and take them out again."""

from __future__ import annotations

from torch import nn

from lily.adapter import get_adapter, lily_layers
from lily.routing import require_mergeable


def merge(model: nn.Module) -> nn.Module:
    """Fold s * B~ A into every adapted weight ("static"/"uniform" routing only); returns `model`.

    Afterwards the adapted layers cost exactly the base layers. Data-dependent routing raises MergeError.
    """
    require_mergeable(get_adapter(model).routing)
    for _, layer in lily_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract exactly what it added; returns `model`."""
    get_adapter(model)
    for _, layer in lily_layers(model):
        layer.unmerge()
    return model
