"""Per-call inputs that adapted layers need but are not given, carried without shared mutable state.

"sample" routing needs the model's `attention_mask`; a parallel adapter whose source and sink differ needs
the input its source saw; sibling layers that read one input (q, k and v) take the low-rank hidden the first
of them computed for all. None of them is stored on a module: each lives in thread-local state, which every
thread sees separately (nested calls restore the outer call's state; `torch.compile` traces it without
graph breaks):

- `ModelCall` (a forward pre-hook and hook on the adapted model) opens one `ForwardCall` per model call,
  holding that call's mask, and closes it when the call returns or raises. What layers derive alike from
  the mask (`from_mask`: kept with the call for as long as replays may need it) or from parameters
  (`per_call`: kept until the call ends) is computed once per call, when a layer first asks for it.
- Activation checkpointing replays a block during backward, after the call has closed. So when a call
  builds an autograd graph and a layer read its mask, its graph's nodes are tagged with the call
  (`Node.metadata`); a replay finds its call through the node that the autograd engine is running.
  Reentrant and non-reentrant checkpointing, several forwards before one backward, and threads then all
  route with the mask of the forward being replayed.
- A direct call of a submodule (outside any model call and any replay) has no mask: "sample" routing
  then pools over every position.
- Siblings share hidden states only within one call of their parent module (`open_siblings`, from hooks on
  the parent), so nothing they keep outlives that call, whether it runs in a model call, a replay or alone.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

METADATA_KEY = "lily_forward_call"
"""Key of `torch.autograd.graph.Node.metadata` under which a call's graph nodes record their call."""


@dataclass(eq=False)
class ForwardCall:
    """One call of the adapted model: its 2-D `attention_mask` (None when not given), and what layers derived
    from the mask (`from_mask`), by key."""

    attention_mask: torch.Tensor | None
    mask_derived: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)
    derived: dict[Any, tuple[tuple, torch.Tensor]] = field(default_factory=dict, repr=False)
    """`per_call`'s tensors by key, each with the modes of its source when it was made; emptied when the call ends."""
    outer: tuple[ForwardCall | None, dict[int, torch.Tensor], tuple] | None = field(default=None, repr=False)
    """While the call runs: the thread's call, captured inputs and sibling calls before it, restored when it ends."""


_LOCAL = threading.local()
"""This thread's open call (`call`), the block inputs its parallel adapters captured (`captured`), and its open
calls of siblings' parents (`siblings`: (family, kept hidden states by layer), innermost last)."""


def _open_call() -> ForwardCall | None:
    return getattr(_LOCAL, "call", None)


def _captured() -> dict[int, torch.Tensor]:
    return getattr(_LOCAL, "captured", None) or {}


def current_call() -> ForwardCall | None:
    """The model call the running forward belongs to: the open call of this thread, else (a checkpointed block
    replayed in backward) the call that built the graph node being run, else None."""
    call = _open_call()
    if call is not None:
        return call
    node = torch._C._current_autograd_node()
    return None if node is None else node.metadata.get(METADATA_KEY)


def from_mask(key: Any, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """`make(mask)` for the attention mask of the current model call (see `current_call`, so also in a replay),
    computed once per call and key and kept with the call; None without a mask. (A mask carries no gradient.)"""
    call = current_call()
    if call is None or call.attention_mask is None:
        return None
    if key not in call.mask_derived:
        call.mask_derived[key] = make(call.attention_mask)
    return call.mask_derived[key]


def per_call(
    key: Any, sources: tuple[torch.Tensor, ...], make: Callable[[], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """`make()`, a function of the tensors `sources` alone, run on `device`, computed once per key in the thread's
    open model call and kept there until the call ends. Made afresh outside any call (a replay in backward
    included, unless it runs inside another open call of its thread, whose kept tensors are then as valid), and
    when a source's in-place version or requires_grad, the grad mode or the autocast dtype on `device` differ
    from when it was kept, so a tensor made without autograd never stands in for one with it."""
    call = _open_call()
    if call is None:
        return make()
    modes = tuple((_version(s), s.requires_grad) for s in sources), *_grad_modes(device)
    kept = call.derived.get(key)
    if kept is not None and kept[0] == modes:
        return kept[1]
    value = make()
    call.derived[key] = modes, value
    return value


def capture_input(key: int, x: torch.Tensor | None) -> None:
    """Keep block input `x` for the parallel adapter `key` until its sink runs (this thread only)."""
    _LOCAL.captured = {**_captured(), key: x}


def take_input(key: int) -> torch.Tensor | None:
    """The input captured for parallel adapter `key`, which is released (None if its source has not run)."""
    captured = _captured()
    if key not in captured:
        return None
    _LOCAL.captured = {k: v for k, v in captured.items() if k != key}
    return captured[key]


def _sibling_calls() -> tuple[tuple[Any, dict[Any, tuple]], ...]:
    return getattr(_LOCAL, "siblings", None) or ()


def open_siblings(family: Any) -> None:
    """Start a call of the parent of `family`'s layers: until `close_siblings`, they may share hidden states."""
    _LOCAL.siblings = (*_sibling_calls(), (family, {}))


def close_siblings(family: Any) -> None:
    """End the innermost call of `family`'s parent (and any call left open inside it); what it kept is released."""
    calls = _sibling_calls()
    ends = [i for i, (open_family, _) in enumerate(calls) if open_family is family]
    if ends:
        _LOCAL.siblings = calls[: ends[-1]]


def sibling_family() -> Any:
    """The siblings whose parent's call is the innermost open one (None outside any)."""
    calls = _sibling_calls()
    return calls[-1][0] if calls else None


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version (not tracked for inference tensors, nor in a compiled graph: None)."""
    return None if torch.compiler.is_compiling() or x.is_inference() else x._version


def _grad_modes(device: torch.device) -> tuple[bool, Any]:
    """The grad mode and the autocast dtype on `device` (False when autocast is off)."""
    return torch.is_grad_enabled(), torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)


def _modes(x: torch.Tensor) -> tuple[Any, ...]:
    """What must not change between computing a hidden state from `x` and using it: x's in-place version, grad
    mode and the autocast dtype."""
    return _version(x), *_grad_modes(x.device)


def share_hidden(x: torch.Tensor, hidden: dict[Any, tuple[Any, torch.Tensor]]) -> None:
    """Keep the hidden states computed from input `x`, {layer: (its branch, h)}, in the innermost sibling call,
    each for its layer."""
    *outer, (family, kept) = _sibling_calls()
    modes = _modes(x)
    new = {layer: (branch, x, modes, h) for layer, (branch, h) in hidden.items()}
    _LOCAL.siblings = (*outer, (family, {**kept, **new}))


def shared_hidden(layer: Any, branch: Any, x: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """(whether a hidden state was kept for `layer` in the innermost sibling call, which is released; that state
    if it was computed for this `branch` from this very input `x` under the same modes (`_modes`), else None)."""
    *outer, (family, kept) = _sibling_calls()
    if layer not in kept:
        return False, None
    _LOCAL.siblings = (*outer, (family, {k: v for k, v in kept.items() if k is not layer}))
    owner, source, modes, h = kept[layer]
    return True, h if owner is branch and source is x and modes == _modes(x) else None


def _graph_roots(output: Any) -> Iterator[torch.autograd.graph.Node]:
    """The autograd nodes of every tensor in a (nested) model output."""
    if isinstance(output, torch.Tensor):
        if output.grad_fn is not None:
            yield output.grad_fn
    elif isinstance(output, dict):  # includes transformers' ModelOutput
        for value in output.values():
            yield from _graph_roots(value)
    elif isinstance(output, list | tuple):
        for value in output:
            yield from _graph_roots(value)


def _tag_graph(output: Any, call: ForwardCall) -> None:
    """Record `call` on every graph node the output depends on that no earlier call has claimed."""
    stack = list(_graph_roots(output))
    while stack:
        node = stack.pop()
        if node is None or METADATA_KEY in node.metadata:
            continue
        node.metadata[METADATA_KEY] = call
        stack.extend(next_node for next_node, _ in node.next_functions)


class ModelCall:
    """The forward pre-hook (`open`) and hook (`close`) on the adapted model that delimit a `ForwardCall`.

    Held by the model's hooks as bound methods, so `copy.deepcopy(model)` copies it with the model.
    """

    def __init__(self, model: nn.Module) -> None:
        params = list(inspect.signature(model.forward).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.position = positional.index("attention_mask") if "attention_mask" in positional else None

    def open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        call = ForwardCall(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
        call.outer = _open_call(), _captured(), _sibling_calls()
        _LOCAL.call, _LOCAL.captured, _LOCAL.siblings = call, {}, ()

    def close(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = _open_call()
        if call is None or call.outer is None:
            return
        # back to the outer state; inputs a source kept for a sink that never ran are released
        (_LOCAL.call, _LOCAL.captured, _LOCAL.siblings), call.outer = call.outer, None
        call.derived.clear()
        if call.mask_derived and torch.is_grad_enabled():  # replays read the mask only if the call did
            _tag_graph(output, call)

    def register(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        return [
            model.register_forward_pre_hook(self.open, with_kwargs=True),
            model.register_forward_hook(self.close, with_kwargs=True, always_call=True),
        ]
