"""`LilyAdapter`: the state Lily attaches to a model -- config, plan, shared banks, routing context.

It is registered on the model root as `model.lily_adapter`, so `model.to(...)`, `model.state_dict()`
and `model.parameters()` see each shared A group and B expert exactly once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from lily.config import LilyConfig
from lily.errors import InjectionError
from lily.layer import LilyLayer, RoutingContext
from lily.plan import TargetType

ADAPTER_ATTR = "lily_adapter"


class MaskCapture:
    """Forward pre-hook that hands the model's 2-D `attention_mask` (given by keyword or position) to the router.

    A callable object rather than a closure, so `copy.deepcopy(model)` gives the copy its own context.
    """

    def __init__(self, context: RoutingContext, model: nn.Module) -> None:
        self.context = context
        params = list(inspect.signature(model.forward).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.position = positional.index("attention_mask") if "attention_mask" in positional else None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class LilyAdapter(nn.Module):
    """Owner of every shared tensor of one adapted model, plus what `remove` needs to undo injection."""

    def __init__(
        self,
        config: LilyConfig,
        plan: list[TargetType],
        trainable_modules: list[str],
        routing_reason: str,
        trainable_before: list[str],
    ) -> None:
        super().__init__()
        self.config = config
        self.plan = plan
        self.trainable_modules = trainable_modules
        self.routing_reason = routing_reason
        self.trainable_before = trainable_before
        self.banks = nn.ModuleDict()
        self.context = RoutingContext()
        self.hook_handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: when the model root is an `nn.Sequential`, the adapter is its last step and passes through."""
        return x

    @property
    def routing(self) -> str:
        assert self.config.routing is not None
        return self.config.routing

    def extra_repr(self) -> str:
        return f"routing={self.routing!r}, r={self.config.r}, scaling={self.config.scaling}"


def find_adapter(model: nn.Module) -> LilyAdapter | None:
    adapter = getattr(model, ADAPTER_ATTR, None)
    return adapter if isinstance(adapter, LilyAdapter) else None


def get_adapter(model: nn.Module) -> LilyAdapter:
    """The model's `LilyAdapter`; raises InjectionError if `lily.inject` was not called on this module."""
    adapter = find_adapter(model)
    if adapter is None:
        raise InjectionError(
            f"{type(model).__name__} has no Lily adapter; call lily.inject(model, config) or "
            "lily.load_adapter(model, path) on this same module first."
        )
    return adapter


def lily_layers(model: nn.Module) -> Iterator[tuple[str, LilyLayer]]:
    """(name, layer) of every adapted layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LilyLayer):
            yield name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter, named as in `model.named_parameters()`: the banks, then each layer's router."""
    adapter = get_adapter(model)
    params = {f"{ADAPTER_ATTR}.{name}": param for name, param in adapter.named_parameters()}
    for layer_name, layer in lily_layers(model):
        for name, param in layer.named_parameters(recurse=False):
            params[f"{layer_name}.{name}"] = param
    return params


def module_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the base modules named in `LilyConfig.trainable_modules`, by their model names."""
    adapter = get_adapter(model)
    return {
        f"{module}.{name}": param
        for module in adapter.trainable_modules
        for name, param in model.get_submodule(module).named_parameters()
    }


def saved_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What an adapter file holds: the Lily tensors plus the trainable modules' parameters."""
    return {**adapter_parameters(model), **module_parameters(model)}
