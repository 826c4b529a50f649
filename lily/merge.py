"""Fold input-independent Lily updates into the base weights, and take them out again."""

from __future__ import annotations

from torch import nn

from lily.adapter import get_adapter, get_adapters, lily_layers, original_module
from lily.errors import MergeError
from lily.layer import LilyLayer
from lily.plan import quantization


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter's s * B~ A into its weights ("static"/"uniform" routing only); returns `model`.

    Afterwards the adapted layers cost exactly the base layers. Data-dependent routing raises MergeError.
    """
    adapters = get_adapters(model)
    if adapters.disabled:
        raise MergeError("adapters are disabled (inside lily.disable_adapters); merge after the block.")
    require_mergeable(model)
    for _, layer in lily_layers(model):
        layer.merge()
    return model


def require_mergeable(model: nn.Module) -> None:
    """Raise MergeError unless the active adapter can be folded into base weights that belong to its layers alone.

    A weight shared with another module (a language-model head tied to the input embeddings) would carry
    the update into that module too, so it is refused; so is a quantized (bitsandbytes) weight.
    """
    get_adapter(model).require_mergeable()
    owners: dict[int, list[str]] = {}
    for module_name, module in original_module(model).named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for layer_name, layer in lily_layers(model):
        if isinstance(layer, LilyLayer) and layer.active is not None:
            quantized = quantization(layer.base_layer)
            if quantized is not None:
                raise MergeError(
                    f"'{layer_name}' is a bitsandbytes {type(layer.base_layer).__name__} ({quantized}): folding the "
                    "update into its weight would mean dequantizing and quantizing again, which rounds most of the "
                    "update away. Run the adapter unmerged, or load the base model unquantized, load the adapter "
                    "onto it (lily.load_adapter) and merge there."
                )
            names = owners[id(layer.base_layer.weight)]
            if len(names) > 1:
                others = [n for n in names if not n.startswith(layer_name + ".")]
                raise MergeError(
                    f"the weight of '{layer_name}' is shared with {others}; merging would change them too. Untie "
                    "the weights (give the layer its own copy) or run the adapter unmerged."
                )


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract exactly what it added; returns `model`."""
    get_adapters(model)
    for _, layer in lily_layers(model):
        layer.unmerge()
    return model
