r"""Routing: from a layer's low-rank hidden h = x A_g^T to its mixture of the B experts.

Notation: h has one row per position, (tokens, r); the router R_l (E x r, one per layer) gives per-token
probabilities p = softmax(h R_l^T) over the E experts; the layer's update is delta = sum_e w_e (h B_e^T).

===========  ==========================================================  ==========================
mode         expert weights w                                            properties
===========  ==========================================================  ==========================
"batch"      mean of p over the batch AND the tokens: one w per layer    the paper's code exactly;
             per forward call                                            couples examples in a batch
"sample"     mean of p over one example's tokens (positions where the    batch- and padding-invariant;
             model's ``attention_mask`` is 0 are left out)               pooled over future tokens
"token"      p itself: every token mixes the experts its own way         leak-free for causal models
"static"     softmax of a learned per-layer logit vector (E values)      input-independent: mergeable
"uniform"    1/E for every expert (the paper's "monoscale")              mergeable; zero-initialised
                                                                         experts stay identical
===========  ==========================================================  ==========================

`add_experts` adds the update to the base layer's output in one matmul per layer. Pooled modes mix the
experts first: one d_out x r map per layer ("batch", "static", "uniform") or per example ("sample", a
batched matmul), costing about what LoRA's up-projection costs. "token" scales h by each expert's weight
and applies all E experts to every token as one (E*r) x d_out map. For "sample" and "token" the update is one
autograd node (`RowMix`) that rebuilds the mixed experts in backward instead of keeping them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lily.errors import MergeError

ROUTING_MODES = ("batch", "sample", "token", "static", "uniform")
DATA_DEPENDENT = ("batch", "sample", "token")
MERGEABLE = ("static", "uniform")
ROW_MIXED = ("sample", "token")
"""Modes whose expert mix differs between rows of h (examples or tokens): their update is one `RowMix` node."""


def require_mergeable(mode: str) -> None:
    """Raise MergeError unless `mode`'s expert weights are independent of the input."""
    if mode not in MERGEABLE:
        raise MergeError(
            f"routing={mode!r} mixes the B experts per input, so the update depends on the input and cannot "
            "be folded into the weights. Train with routing='static' or 'uniform' to merge, or run the "
            "adapter unmerged."
        )


def make_router(
    mode: str,
    r: int,
    num_B: int,
    scale: float = 1.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Parameter | None:
    """The per-layer routing parameter of `mode`, its initial values multiplied by `scale`.

    Data-dependent modes: a bias-free linear map r -> E (E x r), kaiming-uniform like `nn.Linear(r, E)`.
    "static": E logits drawn from N(0, 1). Zero logits would give every layer the same uniform mix and
    zero-initialised experts identical gradients forever (the "uniform" collapse); distinct per-layer
    mixes let the experts drift apart, and a larger `scale` makes the mixes differ more. "uniform": no parameter.
    """
    if mode in DATA_DEPENDENT:
        weight = nn.Parameter(torch.empty(num_B, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif mode == "static":
        weight = nn.Parameter(torch.randn(num_B, device=device, dtype=dtype))
    else:
        return None
    if scale != 1.0:
        with torch.no_grad():
            weight.mul_(scale)
    return weight


def expert_weights(
    mode: str,
    h: torch.Tensor,
    router: torch.Tensor | None,
    num_B: int,
    mask: torch.Tensor | None = None,
    examples: int = 1,
) -> torch.Tensor:
    """Expert weights for hidden `h` (tokens, r).

    Shapes: (E,) for "batch", "static" and "uniform"; (examples, E) for "sample", whose tokens are `examples`
    runs of equally many positions; (tokens, E) for "token". "static" and "uniform" read only the device and
    dtype of `h`. `mask` (examples, positions), used by "sample" only, marks the positions that count.
    """
    if mode == "uniform":
        return torch.full((num_B,), 1.0 / num_B, device=h.device, dtype=h.dtype)
    if mode == "static":
        return torch.softmax(router, dim=-1)
    probs = torch.softmax(F.linear(h, router), dim=-1)
    if mode == "token":
        return probs
    if mode == "batch":
        return probs.mean(dim=0)
    per_position = probs.view(examples, -1, num_B)
    if mask is None:
        return per_position.mean(dim=1)
    keep = mask.to(probs.dtype).unsqueeze(-1)
    return (per_position * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def mix_experts(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_e w_e B_e for weights (..., E) and experts (E, d_out, r): one matmul, shape (..., d_out, r)."""
    num_B, d_out, r = experts.shape
    mixed = torch.mm(weights.reshape(-1, num_B), experts.reshape(num_B, d_out * r))
    return mixed.view(*weights.shape[:-1], d_out, r)


def add_experts(
    mode: str,
    base: torch.Tensor,
    h: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + alpha * sum_e w_e (h B_e^T): the update of hidden h (tokens, r) added to `base` by one matmul.

    `base` (..., d_out) is the layer's output, features last, one position per row of h. For "sample" its first
    dim counts the examples, and `mask` (examples, positions) the positions that count when it has base's
    leading shape (else all count). `experts` is (E, d_out, r).
    """
    num_B, d_out = experts.shape[:2]
    if mode in ROW_MIXED:
        examples = base.shape[0] if base.dim() > 1 else 1
        if mask is not None and (base.dim() != 3 or mask.shape != base.shape[:2]):
            mask = None
        inputs = (base, h, expert_weights(mode, h, router, num_B, mask, examples), experts)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            node = RowMix if torch.compiler.is_compiling() else ForwardADRowMix  # Dynamo cannot trace a jvp
            return node.apply(mode, *inputs, alpha).view(base.shape)  # viewed outside: in-place ops stay legal
        return row_mix(mode, *inputs, alpha).view(base.shape)
    if mode == "uniform":  # the experts' mean: their sum, 1/E folded into alpha
        hidden, up, alpha = h, experts.sum(dim=0), alpha / num_B
    else:  # "batch", "static": one mix per call
        hidden, up = h, mix_experts(expert_weights(mode, h, router, num_B), experts)
    return torch.addmm(base.reshape(-1, d_out), hidden, up.t(), alpha=alpha).view(base.shape)


def token_hidden(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ "token" routing's h scaled by each expert's weight: (tokens, E*r)."""
    return (weights.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)


def token_up(experts: torch.Tensor) -> torch.Tensor:
    """The E experts side by side, (d_out, E*r), copied in r-long runs (far cheaper than B^T's): one matmul with
    `token_hidden` applies all of them."""
    return experts.permute(1, 0, 2).flatten(1)


def row_mix(mode: str, base: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
            alpha: float) -> torch.Tensor:  # fmt: skip
    """base + alpha * sum_e w_e (h B_e^T) with weights per example ("sample", (examples, E): one mix per example,
    applied by one batched matmul; result (examples, positions, d_out)) or per token ("token", (tokens, E): one
    (E*r)-wide matmul; result (tokens, d_out))."""
    _, d_out, r = experts.shape
    if mode == "token":
        return torch.addmm(base.reshape(-1, d_out), token_hidden(h, weights), token_up(experts).t(), alpha=alpha)
    examples = weights.shape[0]
    mixed = mix_experts(weights, experts)
    return torch.baddbmm(base.reshape(examples, -1, d_out), h.view(examples, -1, r), mixed.mT, alpha=alpha)


class RowMix(torch.autograd.Function):
    """`row_mix` as one autograd node that keeps only h, the weights and the experts and rebuilds the mixed experts
    in backward (one matmul for "sample", an elementwise product and a copy for "token"). Plain autograd keeps
    them: E*r numbers per token for "token", a d_out x r map per example for "sample", more than LoRA saves.
    torch.func transforms work (the vmap rule is generated); `ForwardADRowMix` adds forward-mode AD."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mode: str, base: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                alpha: float) -> torch.Tensor:  # fmt: skip
        return row_mix(mode, base, h, weights, experts, alpha)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        mode, base, h, weights, experts, alpha = inputs
        device = h.device.type
        ctx.mode, ctx.alpha, ctx.device, ctx.base_shape = mode, alpha, device, base.shape
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(h, weights, experts)
        ctx.save_for_forward(h, weights, experts)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weights, experts = ctx.saved_tensors
        num_B, d_out, r = experts.shape
        _, _, need_h, need_weights, need_experts, _ = ctx.needs_input_grad
        grad_h = grad_weights = grad_experts = None
        amp = nullcontext() if ctx.autocast is None else torch.autocast(ctx.device, dtype=ctx.autocast)
        with amp:  # the forward's precision
            if ctx.mode == "token":
                grad = grad_out.reshape(-1, d_out) * ctx.alpha
                if need_experts:
                    grad_up = torch.mm(grad.t(), token_hidden(h, weights))
                    grad_experts = grad_up.view(d_out, num_B, r).permute(1, 0, 2)
                if need_h or need_weights:
                    grad_hidden = torch.mm(grad, token_up(experts)).view(-1, num_B, r)
                    grad_weights = (grad_hidden * h.unsqueeze(-2)).sum(-1) if need_weights else None
                    grad_h = (grad_hidden * weights.unsqueeze(-1)).sum(-2) if need_h else None
            else:
                examples = weights.shape[0]
                grad = grad_out.reshape(examples, -1, d_out) * ctx.alpha
                if need_h:
                    grad_h = torch.bmm(grad, mix_experts(weights, experts)).view(-1, r)
                if need_weights or need_experts:
                    grad_mixed = torch.bmm(grad.mT, h.view(examples, -1, r)).view(examples, -1)
                    grad_weights = torch.mm(grad_mixed, experts.view(num_B, -1).t()) if need_weights else None
                    grad_experts = torch.mm(weights.t(), grad_mixed).view(num_B, d_out, r) if need_experts else None
        return None, grad_out.reshape(ctx.base_shape), grad_h, grad_weights, grad_experts, None


class ForwardADRowMix(RowMix):
    """`RowMix` with forward-mode AD (`torch.func.jvp`, `torch.autograd.forward_ad`) for eager mode: Dynamo cannot
    trace a Function with a custom jvp, so compiled code uses `RowMix`."""

    @staticmethod
    def jvp(ctx: Any, _mode: None, d_base: torch.Tensor | None, d_h: torch.Tensor | None,
            d_weights: torch.Tensor | None, d_experts: torch.Tensor | None, _alpha: None) -> torch.Tensor:  # fmt: skip
        """The update is linear in each of h, the weights and the experts: its tangent is a sum of three updates,
        each with one of them replaced by its tangent."""
        h, weights, experts = ctx.saved_tensors
        shape = (h.shape[0], -1) if ctx.mode == "token" else (weights.shape[0], h.shape[0] // weights.shape[0], -1)
        out = h.new_zeros(*shape[:-1], experts.shape[1]) if d_base is None else d_base.reshape(shape)
        for args in ((d_h, weights, experts), (h, d_weights, experts), (h, weights, d_experts)):
            if all(t is not None for t in args):
                out = row_mix(ctx.mode, out, *args, ctx.alpha)
        return out
