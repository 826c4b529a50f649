"""Where adapters attach: `LilyLayer` wraps one Linear/Conv1D/Conv2d layer; `ParallelSlot` adds a parallel adapter
to a block's output. `LilyBranch` is one named adapter's forward maths at such a site.

h     = phi(dropout(x) A_g^T)                 (tokens, r)  A_g: this layer's A group (shared); phi: identity,
                                                           or ReLU/GELU for parallel adapters
w     = routing weights of h                  see lily.routing
y     = base(x) + s * sum_e w_e (h B_e^T)     B_e: the target type's experts (shared)

On a Conv2d, A_g is a k x k conv with the base conv's stride, padding and dilation, and h has one r-vector
per output position (in (N, H', W') order); each B_e is a 1x1 conv, so a position is a token:
"token" routing mixes the experts per pixel, "sample" pools over an image's positions.

Sibling layers that read the same input (q, k and v; gate and up: `SHARED_INPUTS`) compute their h in one
matmul: within one call of their parent, the first of them to run applies the others' A groups too,
concatenated with its own, and keeps their h for them (`lily.calls.share_hidden`); each takes its h only if it
runs on that very input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lily.bank import LilyBank
from lily.calls import (
    capture_input,
    close_siblings,
    from_mask,
    open_siblings,
    per_call,
    share_hidden,
    shared_hidden,
    sibling_family,
    take_input,
)
from lily.errors import MergeError, TargetError
from lily.routing import (
    SHARED_MAP,
    add_experts,
    expert_matrix,
    expert_weights,
    make_router,
    mix_experts,
    position_weights,
    require_mergeable,
)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
"""Nonlinearities a parallel adapter may apply to h (the paper's ViT MLP adapter uses ReLU)."""


Projection = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""down(x, A_g) -> h (tokens, r): how a site applies an A group to its input, one row per output position."""


def linear_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h = x A^T for x (..., d_in), flattened to (tokens, r)."""
    return F.linear(x.reshape(-1, x.shape[-1]), a)


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"))
"""Names of sibling layers (under one parent) that transformers' attention and MLP blocks call on the same input."""

SLOT_ATTR = "lily_parallel"
"""The attribute of a parallel adapter's sink module that holds its `ParallelSlot`."""


class LilyBranch(nn.Module):
    """One named adapter's part of one adapted layer: its router, plus a plain reference to the adapter's shared
    `bank` (its owner is the model's `LilyAdapter`)."""

    def __init__(
        self,
        bank: LilyBank,
        group: int,
        routing: str,
        scaling: float,
        dropout: float,
        activation: str | None = None,
        router_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.group = group
        self.routing = routing
        self.scaling = scaling
        self.dropout = dropout
        self.activation = activation
        self.router = make_router(routing, bank.r, bank.num_B, router_scale, bank.B.device, bank.B.dtype)
        object.__setattr__(self, "bank", bank)

    def a_group(self, device: torch.device) -> torch.Tensor:
        """A_g on `device` (a model split over devices: the shared bank lives on one of them)."""
        a = self.bank.A[self.group]
        return a if a.device == device else a.to(device)

    def experts(self, device: torch.device) -> torch.Tensor:
        """The B experts on `device`."""
        experts = self.bank.B
        return experts if experts.device == device else experts.to(device)

    def down_input(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """What A_g is applied to: dropout(x), in A's dtype unless autocast picks the dtype."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        return x

    def low_rank(self, x: torch.Tensor, down: Projection = linear_down) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, experts): this layer's hidden h = phi(dropout(x) A_g^T), (tokens, r), and the B experts, on x's
        device.

        `down` applies A_g: a linear map, or an adapted conv's own (`LilyLayer.down`)."""
        a = self.a_group(x.device)
        h = down(self.down_input(x, a), a)
        return (ACTIVATIONS[self.activation](h) if self.activation else h), self.experts(x.device)

    def forward(
        self, x: torch.Tensor, base: torch.Tensor, down: Projection = linear_down, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        """base + s * sum_e w_e (h B_e^T): the update for input x added to `base`, the base layer's output
        (features last, one position per row of h; see `low_rank` for `down`), in base's dtype. `h`: this
        layer's hidden if a sibling already computed it from x."""
        h, experts = self.low_rank(x, down) if h is None else (h, self.experts(h.device))
        pool = None
        if self.routing == "sample":  # in the dtype of the routing probabilities: softmax autocasts to float32
            probs = torch.float32 if torch.is_autocast_enabled(h.device.type) else h.dtype
            pool = from_mask(("pool", probs, h.device), lambda mask: position_weights(mask, probs, h.device))
        shared_map = None
        if self.routing in SHARED_MAP:  # the same for every layer of the bank: computed once per model call
            key = self.bank, experts.device, self.routing, self.scaling

            def make() -> torch.Tensor:
                return expert_matrix(self.routing, experts, self.scaling)

            shared_map = per_call(key, (self.bank.B,), make, experts.device)
        dtype = base.dtype
        if dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            base = base.to(h.dtype)  # added in the adapter's precision, rounded once
        out = add_experts(self.routing, base, h, self.router, experts, self.scaling, pool, shared_map)
        return out.to(dtype)

    def fixed_weights(self) -> torch.Tensor:
        """The input-independent expert weights (E,) of "static"/"uniform" routing; MergeError otherwise."""
        require_mergeable(self.routing)
        return expert_weights(self.routing, self.bank.B, self.router, self.bank.num_B)  # fixed modes: h unused

    def update_factors(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s * B~, A): the update s * B~ A of this layer, as (d_out x r) @ (r x fan_in), for expert weights (E,).

        A conv's A kernel (r x d_in x k x k) is flattened to r x (d_in * k * k), the layout of its weight's rows.
        """
        bank = self.bank
        up = self.scaling * mix_experts(weights.to(bank.B), bank.B.detach())
        return up, bank.A[self.group].detach().flatten(1)

    def extra_repr(self) -> str:
        return f"group={self.group}, routing={self.routing!r}, scaling={self.scaling}"


class LilySite(nn.Module):
    """A place adapters attach to. `adapters` holds one `LilyBranch` per named adapter that uses this site;
    `active` names the one in use (None: none). The model's `LilyAdapters` sets `active`."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        """The adapter folded into the base weight, if any (then it is also the active one)."""

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        """Nothing is merged at a site that cannot merge."""


class LilyLayer(LilySite):
    """Wraps a frozen `base_layer` (nn.Linear, possibly bitsandbytes-quantized; Conv1D; nn.Conv2d) and adds the
    active adapter's update to its output.

    The base layer computes W x itself (a quantized one from its quantized weight, in its compute dtype); the
    update is computed from x in the adapter's dtype and added in the output's dtype.
    """

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (for code that reads `module.weight`, e.g. its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """h = x A^T, (tokens, r). A Conv2d applies its A kernel as the base conv applies its weight (stride,
        padding, padding mode, dilation): one token per output position, in (N, H', W') order; an unbatched
        image counts as a batch of one."""
        if self.kind != "conv2d":
            return linear_down(x, a)
        h = self.base_layer._conv_forward(x if x.dim() == 4 else x.unsqueeze(0), a, None)
        return h.movedim(1, -1).reshape(-1, a.shape[0])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.active is None or self.merged is not None:
            return out
        branch = self.adapters[self.active]
        if self.kind != "conv2d":
            return branch(x, out, self.down, self.shared_low_rank(x, branch))
        images = out if out.dim() == 4 else out.unsqueeze(0)
        adapted = branch(x, images.movedim(1, -1), self.down).movedim(-1, 1).reshape(out.shape)  # channels first
        return adapted.contiguous() if out.is_contiguous() else adapted

    def shared_low_rank(self, x: torch.Tensor, branch: LilyBranch) -> torch.Tensor | None:
        """This layer's h from a matmul shared with its siblings in the running call of their parent (`Siblings`):
        kept for it by the sibling that ran first, or, if none did, computed now with theirs (their A groups
        concatenated to its own, once per model call for all blocks that use the same groups), keeping theirs for
        them. None (the layer computes its own) outside such a call, under training dropout, when what was kept
        came from another input, or when no sibling can share (none active and unmerged, without training
        dropout, of the same width and dtype)."""
        siblings = sibling_family()
        family = None if siblings is None else siblings.family.get(self)
        if family is None or (branch.dropout and branch.training):
            return None
        kept, h = shared_hidden(self, branch, x)
        if kept:  # None if kept for another input: then this layer computes its own
            return h
        own = branch.bank.A[branch.group]
        group = [(self, branch)]
        for layer in family:
            if layer is self or layer.active is None or layer.merged is not None:
                continue
            other = layer.adapters[layer.active]
            a = other.bank.A[other.group]
            if not (other.dropout and other.training) and a.shape[1:] == own.shape[1:] and a.dtype == own.dtype:
                group.append((layer, other))
        if len(group) == 1:
            return None
        groups = tuple(other.bank.A[other.group] for _, other in group)  # linear or Conv1D: no activation on h
        key = (*((other.bank, other.group) for _, other in group), x.device)  # the same for blocks of one A group
        a = per_call(key, groups, lambda: torch.cat([other.a_group(x.device) for _, other in group]), x.device)
        hs = linear_down(branch.down_input(x, a), a).split([g.shape[0] for g in groups], 1)
        share_hidden(x, {layer: (other, h) for (layer, other), h in zip(group[1:], hs[1:], strict=True)})
        return hs[0]

    def weight_delta(self, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """up @ down (d_out x fan_in, from `LilyBranch.update_factors`) in the layout of the base weight: (out, in)
        for Linear, (in, out) for Conv1D, (out, in, k, k) for Conv2d."""
        delta = up @ down
        return delta.T if self.kind == "conv1d" else delta.reshape(self.base_layer.weight.shape)

    def _fold(self, up: torch.Tensor, down: torch.Tensor, sign: float) -> None:
        """Add sign * up @ down to the base weight."""
        base = self.base_layer.weight
        base.add_(self.weight_delta(up, down).to(base.dtype), alpha=sign)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter's s * B~ A into the base weight; the forward then costs exactly the base layer.

        The folded factors (s * B~ and A, a LoRA-sized pair) are kept as non-persistent buffers, so
        `unmerge` subtracts exactly what was added even if the adapter weights change in between.
        """
        if self.merged is not None or self.active is None:
            return
        branch = self.adapters[self.active]
        up, down = branch.update_factors(branch.fixed_weights())
        self.register_buffer("merged_up", up, persistent=False)
        self.register_buffer("merged_down", down.clone(), persistent=False)
        self._fold(self.merged_up, self.merged_down, 1.0)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added; the base weight is restored up to rounding."""
        if self.merged is None:
            return
        self._fold(self.merged_up, self.merged_down, -1.0)
        del self.merged_up, self.merged_down
        self.merged = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, active={self.active!r}, merged={self.merged!r}"


class ParallelSlot(LilySite):
    """A parallel adapter on a block: reads the input of `source` and adds its update to the output of `sink`
    (the same module for a plain block), registered on the sink as `<sink>.lily_parallel`.

    It works through forward hooks, so the base modules keep their names and classes. For a plain block one
    hook reads the block's input and adds to its output. With source != sink, a pre-hook on the source
    keeps its input for the current thread (`lily.calls.capture_input`) until the sink's hook takes it; a
    call of the sink alone, without the source first, gets no update.
    """

    def __init__(self, source: nn.Module, sink: nn.Module, source_name: str, same: bool) -> None:
        super().__init__()
        self.source = source_name
        object.__setattr__(self, "sink", sink)  # a plain reference: the sink owns the slot, not the other way
        if same:
            self.handles = [sink.register_forward_hook(self._add_from_args, with_kwargs=True)]
        else:
            self.handles = [
                source.register_forward_pre_hook(self._capture, with_kwargs=True),
                sink.register_forward_hook(self._add_captured),
            ]

    def _add(self, module: nn.Module, x: torch.Tensor | None, output: Any) -> torch.Tensor | None:
        if x is None or self.active is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise TargetError(
                f"the parallel adapter reading '{self.source}' needs a tensor output, but its sink "
                f"({type(module).__name__}) returned {type(output).__name__}; point parallel_modules at a block that "
                "returns a tensor (e.g. 'mlp')."
            )
        branch = self.adapters[self.active]
        shape = (*x.shape[:-1], branch.bank.out_features)
        if output.shape != shape:
            raise TargetError(
                f"the parallel adapter reading '{self.source}' makes an update of shape {shape}, but its "
                f"sink ({type(module).__name__}) returns shape {tuple(output.shape)}; point parallel_modules at a "
                "block whose output has its input's shape (e.g. 'mlp')."
            )
        return branch(x, output)

    def _add_from_args(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
        return self._add(module, block_input(args, kwargs), output)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        capture_input(id(self), block_input(args, kwargs))

    def _add_captured(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        return self._add(module, take_input(id(self)), output)

    def merge(self) -> None:
        if self.active is not None:  # another adapter may be active and mergeable: nothing runs here then
            raise MergeError("a parallel adapter is not a weight update (it has a nonlinearity); it cannot be merged.")

    def detach(self) -> None:
        """Remove the hooks and take the slot off its sink."""
        for handle in self.handles:
            handle.remove()
        delattr(self.sink, SLOT_ATTR)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, active={self.active!r}"


class Siblings:
    """The families of adapted layers (of `SHARED_INPUTS`) under one parent module, each called by it on one input.

    A forward pre-hook and hook (also run when the call raises) on the parent delimit each call of it
    (`lily.calls.open_siblings`), within which each family shares one A matmul (`LilyLayer.shared_low_rank`).
    """

    def __init__(self, families: list[tuple[LilyLayer, ...]]) -> None:
        self.family = {layer: family for family in families for layer in family}
        """Each layer's family (itself included)."""

    def open(self, module: nn.Module, args: tuple) -> None:
        open_siblings(self)

    def close(self, module: nn.Module, args: tuple, output: Any) -> None:
        close_siblings(self)

    def register(self, parent: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        return [parent.register_forward_pre_hook(self.open), parent.register_forward_hook(self.close, always_call=True)]


def link_siblings(model: nn.Module, sites: Iterable[tuple[str, LilySite]]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook a `Siblings` on every parent of two or more adapted layers (not Conv2d) of one family, among `model`'s
    `sites`; the hooks' handles. Which of them run an adapter is checked at each call."""
    families: dict[str, dict[int, list[LilyLayer]]] = {}
    for name, site in sites:
        if isinstance(site, LilyLayer) and site.kind != "conv2d":
            parent, _, leaf = name.rpartition(".")
            for i, family in enumerate(SHARED_INPUTS):
                if leaf in family:
                    families.setdefault(parent, {}).setdefault(i, []).append(site)
    handles = []
    for parent, found in families.items():
        linked = [tuple(layers) for layers in found.values() if len(layers) > 1]
        if linked:
            handles += Siblings(linked).register(model.get_submodule(parent))
    return handles


def block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A block's input: its first positional argument, or `hidden_states`."""
    return args[0] if args else kwargs.get("hidden_states")
