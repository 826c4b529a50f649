"""Put Lily adapters on a model (`inject`) and take them off again (`delete_adapter`, `remove`)."""

from __future__ import annotations

import dataclasses
import sys

from torch import nn

from lily.adapter import (
    ADAPTER_ATTR,
    MODEL_INTEGRATIONS,
    LilyAdapter,
    LilyAdapters,
    find_adapters,
    get_adapter,
    get_adapters,
    lily_layers,
    original_module,
    relink_siblings,
    set_adapter,
)
from lily.bank import LilyBank
from lily.calls import ModelCall
from lily.config import LilyConfig
from lily.errors import InjectionError, MergeError
from lily.layer import SLOT_ATTR, LilyBranch, LilyLayer, LilySite, ParallelSlot
from lily.merge import require_mergeable
from lily.plan import (
    CPU_REPACKING,
    TargetType,
    base_modules,
    check_adaptable,
    plan_targets,
    plan_trainable_modules,
    repacked_for_cpu,
)


def is_causal_lm(model: nn.Module) -> bool:
    """True when `model` is (part of) a Hugging Face model whose positions must not see later tokens."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return True
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return True
    auto = sys.modules.get("transformers")
    if auto is None:
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def has_cross_attention(model: nn.Module) -> bool:
    """True when `model` holds a Hugging Face model with cross-attention, where q reads another input than k and v."""
    configs = (getattr(m, "config", None) for m in model.modules())
    return any(getattr(c, "is_encoder_decoder", False) or getattr(c, "add_cross_attention", False) for c in configs)


def resolve_routing(model: nn.Module, config: LilyConfig) -> tuple[str, str]:
    """The routing mode to use and why."""
    if config.routing is not None:
        return config.routing, "set in LilyConfig"
    if is_causal_lm(model):
        return "token", "default for causal models: pooled routing would let positions see later tokens"
    return "sample", "default for non-causal models: per-example pooling, batch- and padding-invariant"


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a child, including every path of a module registered more than once."""
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)


def _check_name(adapters: LilyAdapters | None, name: str) -> None:
    if adapters is not None and name in adapters:
        raise InjectionError(
            f"the model already has an adapter named {name!r}; pick another name or call "
            f"lily.delete_adapter(model, {name!r}) first."
        )
    if not isinstance(name, str) or not name.isidentifier() or hasattr(LilyAdapters([]), name):
        raise InjectionError(f"adapter name {name!r} must be a Python identifier (and not a LilyAdapters attribute).")


def _check_trainable_modules(adapters: LilyAdapters, modules: list[str]) -> None:
    for other in adapters.values():
        for a in modules:
            for b in other.trainable_modules:
                if a == b or a.startswith(b + ".") or b.startswith(a + "."):
                    raise InjectionError(
                        f"module '{a}' in trainable_modules overlaps '{b}', already trained by adapter "
                        f"{other.name!r}; each trainable module belongs to one adapter."
                    )


def inject(model: nn.Module, config: LilyConfig, name: str = "default") -> nn.Module:
    """Add a Lily adapter called `name` to `model` in place, make it the active one, and return `model`.

    The first adapter freezes every base parameter. A model can carry several adapters, each with its own
    config and sharing; `lily.set_adapter` switches between them (only the active one runs and trains).
    Everything is checked and allocated before the model is touched: on any error it is left as it was.

    Example:
        >>> model = lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=32))
    """
    if not isinstance(config, LilyConfig):
        raise InjectionError(f"lily.inject expects a LilyConfig, got {type(config).__name__}.")
    given, model = model, original_module(model)
    adapters = find_adapters(model)
    _check_name(adapters, name)
    if adapters is None and any(True for _ in lily_layers(model)):
        raise InjectionError(f"{type(model).__name__} holds Lily layers without their adapters; rebuild the model.")
    if adapters is not None and any(layer.merged is not None for _, layer in lily_layers(model)):
        raise MergeError("an adapter is merged into the weights; call lily.unmerge(model) before adding another.")
    repacked = next((n for n, m in base_modules(model) if repacked_for_cpu(m)), None)
    if repacked is not None:
        raise InjectionError(
            f"bitsandbytes repacked the 4-bit weight of '{repacked}' for its CPU inference kernel (the model ran on a "
            "CPU in eval mode without gradients), and that kernel has no backward: no adapter before it could "
            "train. Reload the model and add the adapter before running it; lily then turns the repacking off."
        )
    plan = plan_targets(model, config)
    trainable_modules = plan_trainable_modules(model, config, plan)
    if adapters is not None:
        _check_trainable_modules(adapters, trainable_modules)
    for t in plan:
        if t.placement == "parallel":
            for source, sink in zip(t.sources, t.module_names, strict=True):
                _check_parallel_site(model, source, sink)
    routing, reason = resolve_routing(model, config)

    # allocate everything (the step that can run out of memory) before the model changes
    adapter = LilyAdapter(name, dataclasses.replace(config, routing=routing), plan, trainable_modules, reason)
    sites: list[tuple[TargetType, int, LilyBranch]] = []
    for t in plan:
        device = next(model.get_submodule(t.module_names[0]).parameters()).device
        bank = LilyBank(t.in_features, t.out_features, t.r, t.num_A, config.num_B, t.kernel_size, config.init, device)
        adapter.banks[t.key] = bank
        for i, group in enumerate(t.groups):
            branch = LilyBranch(bank, group, routing, config.scaling, config.dropout, t.activation,
                                config.router_init_scale)  # fmt: skip
            sites.append((t, i, branch))

    if adapters is None:
        repacking = {n: getattr(m, CPU_REPACKING) for n, m in model.named_modules() if hasattr(m, CPU_REPACKING)}
        adapters = LilyAdapters([n for n, p in model.named_parameters() if p.requires_grad], repacking)
        adapters.shares_inputs = not has_cross_attention(model)
        for module_name in repacking:
            setattr(model.get_submodule(module_name), CPU_REPACKING, False)
        for param in model.parameters():
            param.requires_grad_(False)
        model.add_module(ADAPTER_ATTR, adapters)
        adapters.hook_handles = ModelCall(model).register(model)
        for integrate in MODEL_INTEGRATIONS:
            integrate(model, True)
    for t, i, branch in sites:
        if t.placement == "parallel":
            site: LilySite = _parallel_slot(model, t.sources[i], t.module_names[i])
        else:
            site = _layer(model, t.module_names[i])
        site.adapters[name] = branch
    adapters[name] = adapter
    relink_siblings(model)
    set_adapter(model, name)
    return given


def _layer(model: nn.Module, name: str) -> LilyLayer:
    """The LilyLayer at `name`, wrapping the base layer there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, LilyLayer):
        return module
    layer = LilyLayer(module, check_adaptable(name, module))
    _replace_module(model, module, layer)
    return layer


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module: a layer an adapter wraps stands for its base layer."""
    return module.base_layer if isinstance(module, LilyLayer) else module


def _check_parallel_site(model: nn.Module, source: str, sink: str) -> None:
    """Raise InjectionError if a parallel adapter reading `source` cannot be added to module `sink`."""
    sink_module = _unwrapped(model.get_submodule(sink))
    slot = getattr(sink_module, SLOT_ATTR, None)
    if isinstance(slot, ParallelSlot) and slot.source != source:
        raise InjectionError(f"'{sink}' already has a parallel adapter reading '{slot.source}', not '{source}'.")
    if isinstance(sink_module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        raise InjectionError(
            f"parallel adapter sink '{sink}' is a {type(sink_module).__name__}; a container cannot hold the "
            "adapter's slot. Point parallel_modules at the block module instead."
        )


def _parallel_slot(model: nn.Module, source: str, sink: str) -> ParallelSlot:
    """The ParallelSlot on module `sink` (reading the input of `source`), created if needed.

    The slot and its hooks go on the base modules, so a sink or source that is also an adapted layer keeps
    its slot when that layer is unwrapped.
    """
    sink_module = _unwrapped(model.get_submodule(sink))
    slot = getattr(sink_module, SLOT_ATTR, None)
    if isinstance(slot, ParallelSlot):
        return slot
    slot = ParallelSlot(_unwrapped(model.get_submodule(source)), sink_module, source, same=source == sink)
    sink_module.add_module(SLOT_ATTR, slot)
    return slot


def _drop_site(model: nn.Module, site: LilySite) -> None:
    """Take an adapter site with no adapters left off the model."""
    if isinstance(site, LilyLayer):
        _replace_module(model, site, site.base_layer)
    elif isinstance(site, ParallelSlot):
        site.detach()


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Take adapter `name` off `model` (unmerging it if merged) and return `model`.

    Its trainable modules get back the `requires_grad` they had before the first injection. If another
    adapter remains and `name` was active, the first remaining one becomes active. Deleting the last
    adapter is `lily.remove(model)`.
    """
    given, model = model, original_module(model)
    adapters = get_adapters(model)
    adapter = get_adapter(model, name)
    if list(adapters) == [name]:
        return remove(given)
    for _, layer in list(lily_layers(model)):
        if name not in layer.adapters:
            continue
        if layer.merged == name:
            layer.unmerge()
        del layer.adapters[name]
        if not layer.adapters:
            _drop_site(model, layer)
    trainable = set(adapters.trainable_before)
    for module in adapter.trainable_modules:
        for n, param in model.get_submodule(module).named_parameters():
            param.requires_grad_(f"{module}.{n}" in trainable)
    del adapters[name]
    relink_siblings(model)
    set_adapter(model, adapters.active if adapters.active != name else next(iter(adapters)))
    return given


def remove(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take every adapter off `model` and return it.

    With `merge=False` the original modules come back untouched: bit-identical, unless they were merged
    (then they are unmerged first); `trainable_modules` keep their trained weights. With `merge=True` the
    active adapter's update is folded into the base weights for good (input-independent routing only),
    like PEFT's `merge_and_unload`; other adapters are dropped.
    """
    given, model = model, original_module(model)
    adapters = get_adapters(model)
    layers = list(lily_layers(model))
    if merge:
        require_mergeable(model)
    for _, layer in layers:
        layer.unmerge()
        if merge:
            layer.merge()
        _drop_site(model, layer)
    for handle in adapters.hook_handles + adapters.sibling_handles:
        handle.remove()
    for module_name, repacking in adapters.cpu_repacking.items():
        setattr(model.get_submodule(module_name), CPU_REPACKING, repacking)
    delattr(model, ADAPTER_ATTR)
    for integrate in MODEL_INTEGRATIONS:
        integrate(model, False)
    trainable = set(adapters.trainable_before)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return given
