"""`LilyLayer`: one adapted Linear/Conv1D layer; `LilyBranch`: one named adapter's forward maths on it.

h     = dropout(x) A_g^T                      (..., r)     A_g: this layer's A group (shared)
w     = routing weights of h                  see lily.routing
y     = base(x) + s * sum_e w_e (h B_e^T)     B_e: the target type's experts (shared)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lily.bank import LilyBank
from lily.routing import apply_experts, expert_weights, make_router, mix_experts, require_mergeable


class RoutingContext:
    """Per-call inputs the router needs but the layer is not given: the model's `attention_mask`.

    Set by a forward pre-hook on the adapted model. It is kept after the call, so that activation
    checkpointing recomputes each layer with the mask of the forward pass it replays.
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None


class LilyBranch(nn.Module):
    """One named adapter's part of one adapted layer: its router, plus plain references to the adapter's shared
    `bank` and the model's routing `context` (their owners are the model's `LilyAdapter` and `LilyAdapters`)."""

    def __init__(
        self,
        bank: LilyBank,
        group: int,
        routing: str,
        scaling: float,
        dropout: float,
        context: RoutingContext,
    ) -> None:
        super().__init__()
        self.group = group
        self.routing = routing
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = make_router(routing, bank.r, bank.num_B, device=bank.B.device, dtype=bank.B.dtype)
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "context", context)

    def low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, experts): this layer's hidden h = dropout(x) A_g^T and the B experts, on x's device."""
        bank = self.bank
        a, experts = bank.A[self.group], bank.B
        if a.device != x.device:  # a model split over devices: the shared bank lives on one of them
            a, experts = a.to(x.device), experts.to(x.device)
        x = self.dropout(x)
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        return F.linear(x, a), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled update sum_e w_e (h B_e^T) for input x."""
        h, experts = self.low_rank(x)
        mask = self.context.attention_mask if self.routing == "sample" else None
        weights = expert_weights(self.routing, h, self.router, self.bank.num_B, mask)
        return apply_experts(self.routing, h, experts, weights)

    def fixed_weights(self) -> torch.Tensor:
        """The input-independent expert weights (E,) of "static"/"uniform" routing; MergeError otherwise."""
        require_mergeable(self.routing)
        return expert_weights(self.routing, self.bank.B, self.router, self.bank.num_B)  # fixed modes: h unused

    def update_factors(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s * B~, A): the update s * B~ A of this layer, as (d_out x r) @ (r x d_in), for expert weights (E,)."""
        bank = self.bank
        return self.scaling * mix_experts(weights.to(bank.B), bank.B.detach()), bank.A[self.group].detach()

    def extra_repr(self) -> str:
        return f"group={self.group}, routing={self.routing!r}, scaling={self.scaling}"


class LilyLayer(nn.Module):
    """Wraps a frozen `base_layer` (nn.Linear or Conv1D) and adds the active adapter's update to its output.

    `adapters` holds one `LilyBranch` per named adapter that targets this layer; `active` names the one in
    use (None: the base layer alone). The model's `LilyAdapters` sets `active`.
    """

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        """The adapter folded into the base weight, if any (then it is also the active one)."""

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (for code that reads `module.weight`, e.g. its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.active is None or self.merged is not None:
            return out
        branch = self.adapters[self.active]
        return torch.add(out, branch(x).to(out.dtype), alpha=branch.scaling)

    def _fold(self, up: torch.Tensor, down: torch.Tensor, sign: float) -> None:
        """Add sign * up @ down to the base weight, in its layout ((out, in) Linear, (in, out) Conv1D)."""
        delta = up @ down
        base = self.base_layer.weight
        base.add_((delta if self.kind == "linear" else delta.T).to(base.dtype), alpha=sign)

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
