"""The state Lily attaches to a model: `LilyAdapters` (on the root) holding one `LilyAdapter` per name.

Also the adapter-level operations that need no injection: look-ups, parameters, switching and disabling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lily.config import LilyConfig
from lily.errors import InjectionError, MergeError
from lily.layer import LilyBranch, LilySite, link_siblings
from lily.plan import ADAPTER_ATTR, TargetType
from lily.routing import require_mergeable

FILE_PREFIX = "lily_adapter"
"""Prefix of the bank tensors in an adapter file (format version 1)."""


class LilyAdapter(nn.Module):
    """One named adapter: its config, layer plan and shared banks (their only owner)."""

    def __init__(
        self, name: str, config: LilyConfig, plan: list[TargetType], trainable_modules: list[str], routing_reason: str
    ) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.plan = plan
        self.trainable_modules = trainable_modules
        self.routing_reason = routing_reason
        self.inference_mode = False
        """Frozen even while active (loaded for inference); `set_adapter(..., inference_mode=False)` unfreezes."""
        self.banks = nn.ModuleDict()

    @property
    def routing(self) -> str:
        assert self.config.routing is not None
        return self.config.routing

    def require_mergeable(self) -> None:
        """Raise MergeError unless this adapter's update can be folded into the weights."""
        require_mergeable(self.routing)
        parallel = [t.target for t in self.plan if t.placement == "parallel"]
        if parallel:
            raise MergeError(f"adapter {self.name!r} has parallel adapters ({parallel}), which cannot be merged.")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, routing={self.routing!r}, r={self.config.r}, scaling={self.config.scaling}"


class LilyAdapters(nn.ModuleDict):
    """Every named adapter of one model, registered on its root as `model.lily_adapters`, so `model.to(...)`,
    `model.state_dict()` and `model.parameters()` see each shared A group and B expert exactly once.

    Holds which adapter is active, whether adapters are disabled, and what `remove` needs to restore the
    model (including the handles of the hooks that delimit each model call and each call of siblings' parents, see
    `lily.calls`).
    """

    def __init__(self, trainable_before: list[str], cpu_repacking: dict[str, bool] | None = None) -> None:
        super().__init__()
        self.active: str | None = None
        self.disabled = False
        self.trainable_before = trainable_before
        self.cpu_repacking = cpu_repacking or {}
        """bitsandbytes 4-bit layers by name, with their own `lily.plan.CPU_REPACKING` value (`remove` restores it)."""
        self.hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.shares_inputs = True
        """Whether siblings that read one input share their A matmul (`lily.layer.Siblings`): not in a model with
        cross-attention, where q reads another input than k and v."""
        self.sibling_handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: when the model root is an `nn.Sequential`, the adapters are its last step and pass through."""
        return x


MODEL_INTEGRATIONS: list[Callable[[nn.Module, bool], None]] = []
"""Called with (model, True) when a model gets its first adapter and (model, False) when it loses its last.
Integrations with other libraries (`lily.pretrained` for transformers) register here, so that the core never
imports them."""


def original_module(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` handle wraps (otherwise `model` itself): lily's verbs act on it, so saving,
    loading, injecting and merging through the handle see the original names."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # a compiled handle exists only once it is imported
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return model


def find_adapters(model: nn.Module) -> LilyAdapters | None:
    adapters = getattr(original_module(model), ADAPTER_ATTR, None)
    return adapters if isinstance(adapters, LilyAdapters) else None


def get_adapters(model: nn.Module) -> LilyAdapters:
    """The model's `LilyAdapters`; raises InjectionError if `lily.inject` was not called on this module."""
    adapters = find_adapters(model)
    if adapters is None:
        raise InjectionError(
            f"{type(model).__name__} has no Lily adapter; call lily.inject(model, config) or "
            "lily.load_adapter(model, path) on this same module first."
        )
    return adapters


def get_adapter(model: nn.Module, name: str | None = None) -> LilyAdapter:
    """The model's adapter called `name` (default: the active one); InjectionError if there is none."""
    adapters = get_adapters(model)
    name = adapters.active if name is None else name
    if name not in adapters:
        raise InjectionError(f"{type(model).__name__} has no Lily adapter named {name!r}; it has {list(adapters)}.")
    return adapters[name]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    return list(get_adapters(model))


def lily_layers(model: nn.Module) -> Iterator[tuple[str, LilySite]]:
    """(name, site) of every adapted layer (`LilyLayer`) and parallel adapter slot (`ParallelSlot`), in model
    order."""
    for name, module in original_module(model).named_modules():
        if isinstance(module, LilySite):
            yield name, module


def branches(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, LilyBranch]]:
    """(layer name, branch) of every layer the adapter `name` (default: the active one) adapts, in model order."""
    name = get_adapter(model, name).name
    for layer_name, layer in lily_layers(model):
        if name in layer.adapters:
            yield layer_name, layer.adapters[name]


def _lily_tensors(model: nn.Module, name: str | None, file_names: bool) -> dict[str, nn.Parameter]:
    """The banks, then each layer's router, of adapter `name`: by model name, or by adapter-file name."""
    adapter = get_adapter(model, name)
    banks = FILE_PREFIX if file_names else f"{ADAPTER_ATTR}.{adapter.name}"
    params = {f"{banks}.{n}": p for n, p in adapter.named_parameters()}
    for layer_name, branch in branches(model, adapter.name):
        where = layer_name if file_names else f"{layer_name}.adapters.{adapter.name}"
        params.update({f"{where}.{n}": p for n, p in branch.named_parameters()})
    return params


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Every parameter of adapter `name` (default: the active one), named as in `model.named_parameters()`:
    its banks, then each layer's router."""
    return _lily_tensors(model, name, file_names=False)


def module_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Parameters of the base modules named in the adapter's `LilyConfig.trainable_modules`, by their model names."""
    adapter = get_adapter(model, name)
    model = original_module(model)
    return {
        f"{module}.{n}": param
        for module in adapter.trainable_modules
        for n, param in model.get_submodule(module).named_parameters()
    }


def saved_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """What an adapter file holds, by file name: the Lily tensors plus the trainable modules' parameters.

    File names do not depend on the adapter's name: banks are `lily_adapter.banks.<type>...` and routers
    `<layer>.router`, so a file loads under any adapter name.
    """
    return {**_lily_tensors(model, name, file_names=True), **module_parameters(model, name)}


def relink_siblings(model: nn.Module) -> None:
    """Hook the parents of adapted siblings that read one input (`lily.layer.link_siblings`) anew, after layers
    were wrapped or unwrapped; not in a model with cross-attention."""
    adapters = get_adapters(model)
    for handle in adapters.sibling_handles:
        handle.remove()
    model = original_module(model)
    adapters.sibling_handles = link_siblings(model, lily_layers(model)) if adapters.shares_inputs else []


def _sync(model: nn.Module, adapters: LilyAdapters) -> None:
    """Point every layer at the active adapter (None where it is disabled or does not adapt the layer)."""
    active = None if adapters.disabled else adapters.active
    for _, layer in lily_layers(model):
        layer.active = active if active in layer.adapters else None


def set_adapter(model: nn.Module, name: str, inference_mode: bool | None = None) -> nn.Module:
    """Make adapter `name` the one the model runs and trains: its parameters (and trainable modules) require
    grad unless it is in inference mode; every other adapter's are frozen. `inference_mode` (None: keep the
    adapter's own, which `lily.load_adapter(..., is_trainable=False)` sets) freezes or unfreezes it for good.
    Raises MergeError while another adapter is merged."""
    adapters = get_adapters(model)
    adapter = get_adapter(model, name)
    merged = {layer.merged for _, layer in lily_layers(model)} - {None, name}
    if merged:
        raise MergeError(f"adapter {merged.pop()!r} is merged into the weights; call lily.unmerge(model) first.")
    if inference_mode is not None:
        adapter.inference_mode = inference_mode
    for other in adapters:
        trainable = other == name and not adapter.inference_mode
        for param in adapter_parameters(model, other).values():
            param.requires_grad_(trainable)
        for param in module_parameters(model, other).values():
            param.requires_grad_(trainable)
    adapters.active = name
    _sync(model, adapters)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every adapter is off (a merged one is unmerged, then merged again).

    Example:
        >>> with lily.disable_adapters(model):
        ...     reference = model(**batch)
    """
    adapters = get_adapters(model)
    merged = [layer for _, layer in lily_layers(model) if layer.merged is not None]
    was_disabled = adapters.disabled
    for layer in merged:
        layer.unmerge()
    adapters.disabled = True
    _sync(model, adapters)
    try:
        yield model
    finally:
        adapters.disabled = was_disabled
        _sync(model, adapters)
        for layer in merged:
            layer.merge()
