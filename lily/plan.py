"""Find the layers to adapt, form target types, and split each type's layers into A groups.

A *target type* is (matched target name, weight shape, and for a conv its kernel size): all its layers share
one set of A groups and one set of B experts. Layer order is module order in the model. Nothing here touches the model.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import regex
import torch
from torch import nn

from lily.config import LilyConfig
from lily.errors import ConfigError, TargetError
from lily.layer import LilyLayer

ADAPTER_ATTR = "lily_adapters"
"""The attribute of the model root that holds its adapters (`lily.adapter.LilyAdapters`)."""

REGEX_BUDGET_S = 2.0
"""Seconds all matches of a `target_modules` regex against one model's module names may take together: a
pattern from an untrusted config can backtrack for hours."""


@dataclass(frozen=True)
class TargetType:
    """The layers of one target type and the A group of each."""

    key: str
    """Unique identifier used in parameter names (no dots)."""
    target: str
    """The target name the layers matched: the suffix from the list, or the index-free module name."""
    in_features: int
    out_features: int
    module_names: tuple[str, ...]
    """The adapted layers; for a parallel type, the sinks (whose output gets the update)."""
    groups: tuple[int, ...]
    """A-group index of each layer, non-decreasing, covering 0..num_A-1."""
    r: int
    placement: str = "layer"
    """"layer" (the update of a Linear/Conv1D) or "parallel" (a parallel adapter on a block)."""
    sources: tuple[str, ...] = ()
    """Parallel types: the module whose input each adapter reads (the sink itself for a plain block)."""
    activation: str | None = None
    kernel_size: tuple[int, ...] = ()
    """Conv2d types: the kernel size of the layers (and of their A groups); () otherwise."""

    @property
    def num_layers(self) -> int:
        return len(self.module_names)

    @property
    def num_A(self) -> int:
        return self.groups[-1] + 1

    @property
    def fan_in(self) -> int:
        """Inputs per output of one layer: in_features, times the kernel's positions for a conv."""
        return self.in_features * math.prod(self.kernel_size)

    def group_sizes(self) -> list[int]:
        return [self.groups.count(g) for g in range(self.num_A)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "target": self.target,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "module_names": list(self.module_names),
            "groups": list(self.groups),
            **({"kernel_size": list(self.kernel_size)} if self.kernel_size else {}),
            **({"r": self.r, "placement": self.placement, "sources": list(self.sources), "activation": self.activation}
               if self.placement == "parallel" else {}),
        }  # fmt: skip


def layer_kind(module: nn.Module) -> str | None:
    """'linear' for nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt subclass it), 'conv2d' for nn.Conv2d,
    'conv1d' for transformers' Conv1D (weight stored as in x out), else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # a model can only hold Conv1D if loaded
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        return "conv1d"
    return None


def quantization(module: nn.Module) -> str | None:
    """The quantization of a bitsandbytes layer: 'nf4' or 'fp4' (Linear4bit), 'int8' (Linear8bitLt); else None."""
    bnb = sys.modules.get("bitsandbytes.nn")  # a model can only hold bitsandbytes layers if it is loaded
    if bnb is not None and isinstance(module, bnb.Linear4bit):
        return str(module.weight.quant_type)
    if bnb is not None and isinstance(module, bnb.Linear8bitLt):
        return "int8"
    return None


CPU_REPACKING = "support_avx512bf16_for_cpu"
"""The attribute of a bitsandbytes Linear4bit that lets it repack its weight, in a CPU forward in eval mode without
gradients, for an inference kernel that has no backward. Every later backward through the layer then loses the
gradients of the adapters before it, silently; `lily.inject` turns it off on every layer of the model."""


def repacked_for_cpu(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked `module`'s 4-bit weight for its CPU inference kernel (see CPU_REPACKING)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def weight_shape(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer: channels for a conv; for nn.Linear its declared sizes,
    since a quantized layer stores its weight packed (a 4-bit weight has shape (out * in / 2, 1))."""
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv2d":
        return module.in_channels, module.out_channels
    rows, cols = module.weight.shape
    return rows, cols


def kernel_size(module: nn.Module, kind: str) -> tuple[int, ...]:
    """The kernel size of a conv layer, () for the other kinds."""
    return tuple(module.kernel_size) if kind == "conv2d" else ()


def check_adaptable(name: str, module: nn.Module) -> str:
    """Return the layer kind of `module`, or raise a TargetError that says why it cannot be adapted."""
    kind = layer_kind(module)
    if kind is None:
        raise TargetError(
            f"target_modules selected module '{name}' of type {type(module).__name__}, but lily adapts only "
            "nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt included), nn.Conv2d and transformers' Conv1D; "
            "narrow target_modules so it selects only such layers."
        )
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise TargetError(
            f"module '{name}' is the output projection of nn.MultiheadAttention, which reads its weight "
            "directly and would bypass the adapter; target other layers."
        )
    if kind == "conv2d" and module.groups != 1:
        raise TargetError(
            f"module '{name}' is an nn.Conv2d with groups={module.groups}; lily adapts only convs with groups=1 "
            "(a grouped or depthwise conv mixes no channels across groups). Narrow target_modules to leave it out."
        )
    if kind == "conv2d" and type(module).forward is not nn.Conv2d.forward:
        raise TargetError(
            f"module '{name}' is a {type(module).__name__}, an nn.Conv2d with its own forward (e.g. padding computed "
            "there), so lily cannot apply its A conv with the layer's geometry; narrow target_modules to leave it out."
        )
    weight = getattr(module, "weight", None)
    plain = type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point
    other_bitsandbytes = type(module).__module__.startswith("bitsandbytes")  # quantizes in its forward
    if quantization(module) is None and (other_bitsandbytes or not plain):
        raise TargetError(
            f"module '{name}' ({type(module).__name__}) has a quantized or non-float weight "
            f"({type(weight).__name__}, {getattr(weight, 'dtype', None)}); lily adapts plain floating-point weights "
            "and bitsandbytes' Linear4bit (nf4, fp4) and Linear8bitLt. Load the model in a float dtype, or "
            "quantize it with bitsandbytes."
        )
    return kind


def index_free_name(module_name: str) -> str:
    """Module name without its numeric path parts: 'model.layers.3.self_attn.q_proj' -> 'model.layers.self_attn.q_proj'.

    A name made only of indices (layers of an `nn.Sequential`) gives 'layer'.
    """
    return ".".join(part for part in module_name.split(".") if not part.isdigit()) or "layer"


def longest_suffix(name: str, suffixes: list[str]) -> str | None:
    """The longest of `suffixes` that `name` ends with at a '.' boundary (or equals), else None."""
    hits = [s for s in suffixes if name == s or name.endswith("." + s)]
    return max(hits, key=len) if hits else None


def _target_matcher(config: LilyConfig) -> Callable[[str], str | None]:
    """name -> the target name it matched (or None). A regex gets REGEX_BUDGET_S seconds for all its matches."""
    targets = config.target_modules
    if not isinstance(targets, str):
        return lambda name: longest_suffix(name, targets)
    pattern = regex.compile(targets)
    deadline = time.monotonic() + REGEX_BUDGET_S

    def match(name: str) -> str | None:
        try:
            hit = pattern.fullmatch(name, timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise ConfigError(
                f"LilyConfig.target_modules regex {targets!r} took too long (over {REGEX_BUDGET_S} s) to match the "
                "module names; it backtracks catastrophically. Use a simpler pattern or a list of suffixes."
            ) from None
        return index_free_name(name) if hit else None

    return match


def plan_trainable_modules(model: nn.Module, config: LilyConfig, targets: list[TargetType]) -> list[str]:
    """Names of the base modules `config.trainable_modules` selects; each suffix must select something."""
    adapted = {name for t in targets for name in t.module_names}
    names = [n for n, _ in base_modules(model) if n and longest_suffix(n, config.trainable_modules)]
    for suffix in config.trainable_modules:
        if not any(longest_suffix(n, [suffix]) for n in names):
            raise TargetError(
                f"LilyConfig.trainable_modules entry {suffix!r} matched no module; " + _example_names(model)
            )
    clash = sorted(n for n in names if n in adapted or any(a.startswith(n + ".") for a in adapted))
    if clash:
        raise TargetError(
            f"module '{clash[0]}' is selected by both trainable_modules and target_modules; a module is either "
            "fully trained or adapted, not both."
        )
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only


def split_groups(num_layers: int, num_A: int | None, layers_per_A: int | None, what: str) -> tuple[int, ...]:
    """A-group index of each of `num_layers` consecutive layers.

    With `num_A`: exactly num_A contiguous runs whose lengths differ by at most one (longer runs first).
    With `layers_per_A`: runs of that length, the last one possibly shorter.
    """
    if layers_per_A is not None:
        return tuple(i // layers_per_A for i in range(num_layers))
    assert num_A is not None
    if num_A > num_layers:
        raise ConfigError(
            f"LilyConfig.num_A={num_A} is larger than the {num_layers} layer(s) of target type {what}; "
            f"use num_A <= {num_layers} (or layers_per_A)."
        )
    base, extra = divmod(num_layers, num_A)
    groups: list[int] = []
    for g in range(num_A):
        groups += [g] * (base + (1 if g < extra else 0))
    return tuple(groups)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` as the base model has them: a layer another adapter already wraps counts as its
    base layer, under the layer's own name, and the wrapper's insides and the adapters' own modules are skipped."""
    inner = {ADAPTER_ATTR + "."}
    for name, module in model.named_modules():
        if name == ADAPTER_ATTR or any(name.startswith(prefix) for prefix in inner):
            continue
        if isinstance(module, LilyLayer):
            inner.add(name + ".")
            module = module.base_layer
        yield name, module


def _example_names(model: nn.Module, limit: int = 12) -> str:
    leaves: dict[str, str] = {}
    for name, module in base_modules(model):
        if name and layer_kind(module) is not None:
            leaves.setdefault(name.rsplit(".", 1)[-1], name)
    if not leaves:
        return "the model has no nn.Linear, nn.Conv2d or Conv1D layers at all."
    shown = ", ".join(f"'{short}' (e.g. '{full}')" for short, full in list(leaves.items())[:limit])
    return f"adaptable layers in this model include: {shown}."


def plan_targets(model: nn.Module, config: LilyConfig) -> list[TargetType]:
    """Find every module `config.target_modules` and `config.parallel_modules` select and group them into
    target types (layer types first, then parallel ones)."""
    found: dict[tuple[str, int, int, tuple[int, ...]], list[str]] = {}
    matched_target = _target_matcher(config)
    for name, module in base_modules(model):
        if not name:
            continue
        target = matched_target(name)
        if target is None:
            continue
        kind = check_adaptable(name, module)
        found.setdefault((target, *weight_shape(module, kind), kernel_size(module, kind)), []).append(name)
    if config.target_modules and not found:
        raise TargetError(
            f"LilyConfig.target_modules={config.target_modules!r} matched no module; " + _example_names(model)
        )
    plan: list[TargetType] = []
    used_keys: set[str] = set()
    for (target, d_in, d_out, kernel), names in found.items():
        shape = f"{d_in}x{d_out}" + (f"_k{'x'.join(map(str, kernel))}" if kernel else "")
        key = _type_key(target, shape, sum(t == target for t, *_ in found), used_keys)
        groups = split_groups(len(names), config.num_A, config.layers_per_A, f"'{target}' ({shape})")
        plan.append(TargetType(key, target, d_in, d_out, tuple(names), groups, config.r, kernel_size=kernel))
    for entry in config.parallel_modules:
        blocks = _parallel_blocks(model, entry)
        for (d_in, d_out), pairs in blocks.items():
            key = _type_key(f"parallel_{entry}", f"{d_in}x{d_out}", len(blocks), used_keys)
            groups = split_groups(len(pairs), config.num_A, config.layers_per_A, f"parallel '{entry}'")
            assert config.parallel_r is not None
            plan.append(TargetType(key, entry, d_in, d_out, tuple(sink for _, sink in pairs), groups,
                                   config.parallel_r, "parallel", tuple(source for source, _ in pairs),
                                   config.parallel_activation))  # fmt: skip
    return plan


def _type_key(target: str, shape: str, shapes: int, used: set[str]) -> str:
    """A unique identifier (no dots) for a target type; `shape` ('64x128', or '64x128_k3x3' for a conv) is added
    when a target has several."""
    key = re.sub(r"\W", "_", target)
    if shapes > 1:
        key = f"{key}_{shape}"
    while key in used:
        key += "_"
    used.add(key)
    return key


def _width(name: str, module: nn.Module, first: bool) -> int:
    """Input width of the first (or output width of the last) Linear/Conv1D in `module`."""
    layers = [m for _, m in base_modules(module) if layer_kind(m) in ("linear", "conv1d")]
    if not layers:
        raise TargetError(
            f"parallel_modules: cannot tell the {'input' if first else 'output'} width of '{name}' "
            f"({type(module).__name__}): it holds no nn.Linear or Conv1D."
        )
    layer = layers[0] if first else layers[-1]
    d_in, d_out = weight_shape(layer, layer_kind(layer) or "linear")
    return d_in if first else d_out


def _parallel_blocks(model: nn.Module, entry: str) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """(source, sink) module names of one `parallel_modules` entry, by (input width, output width)."""
    source_suffix, _, sink_path = entry.partition(">")
    found: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for name, module in base_modules(model):
        if not name or not longest_suffix(name, [source_suffix]):
            continue
        sink = name
        if sink_path:
            parent = name.rpartition(".")[0]
            sink = f"{parent}.{sink_path}" if parent else sink_path
            try:
                model.get_submodule(sink)
            except AttributeError:
                raise TargetError(f"parallel_modules entry {entry!r}: '{name}' has no sibling '{sink}'.") from None
        widths = (_width(name, module, True), _width(sink, model.get_submodule(sink), False))
        found.setdefault(widths, []).append((name, sink))
    if not found:
        raise TargetError(f"LilyConfig.parallel_modules entry {entry!r} matched no module; " + _example_names(model))
    return found
