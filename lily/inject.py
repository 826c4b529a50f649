"""Put Lily adapters on a model (`inject`) and take them off again (`remove`)."""

from __future__ import annotations

import dataclasses
import sys

from torch import nn

from lily.adapter import ADAPTER_ATTR, LilyAdapter, MaskCapture, find_adapter, get_adapter, lily_layers
from lily.bank import LilyBank
from lily.config import LilyConfig
from lily.errors import InjectionError
from lily.layer import LilyLayer
from lily.plan import check_adaptable, plan_targets, plan_trainable_modules
from lily.routing import require_mergeable


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


def inject(model: nn.Module, config: LilyConfig) -> nn.Module:
    """Add Lily adapters to `model` in place, freeze every base parameter, and return `model`.

    Example:
        >>> model = lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=32))
    """
    if find_adapter(model) is not None or any(True for _ in lily_layers(model)):
        raise InjectionError(
            f"{type(model).__name__} already has Lily adapters; call lily.remove(model) before injecting again."
        )
    if not isinstance(config, LilyConfig):
        raise InjectionError(f"lily.inject expects a LilyConfig, got {type(config).__name__}.")
    plan = plan_targets(model, config)
    trainable_modules = plan_trainable_modules(model, config, plan)
    routing, reason = resolve_routing(model, config)
    trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    adapter = LilyAdapter(
        dataclasses.replace(config, routing=routing), plan, trainable_modules, reason, trainable_before
    )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in trainable_modules:
        model.get_submodule(name).requires_grad_(True)

    for target_type in plan:
        first = model.get_submodule(target_type.module_names[0])
        bank = LilyBank(
            target_type.in_features,
            target_type.out_features,
            config.r,
            target_type.num_A,
            config.num_B,
            device=first.weight.device,
        )
        adapter.banks[target_type.key] = bank
        for name, group in zip(target_type.module_names, target_type.groups, strict=True):
            module = model.get_submodule(name)
            layer = LilyLayer(
                module,
                check_adaptable(name, module),
                bank,
                group,
                routing,
                config.scaling,
                config.dropout,
                adapter.context,
            )
            _replace_module(model, module, layer)

    model.add_module(ADAPTER_ATTR, adapter)
    if routing == "sample":
        hook = MaskCapture(adapter.context, model)
        adapter.hook_handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    return model


def remove(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take the adapters off `model` and return it.

    With `merge=False` the original modules come back untouched: bit-identical, unless they were merged
    (then they are unmerged first); `trainable_modules` keep their trained weights. With `merge=True` the
    update is folded into the base weights for good (input-independent routing only), like PEFT's
    `merge_and_unload`.
    """
    adapter = get_adapter(model)
    layers = list(lily_layers(model))
    if merge:
        require_mergeable(adapter.routing)
    for _, layer in layers:
        layer.merge() if merge else layer.unmerge()
        _replace_module(model, layer, layer.base_layer)
    for handle in adapter.hook_handles:
        handle.remove()
    delattr(model, ADAPTER_ATTR)
    trainable = set(adapter.trainable_before)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model
