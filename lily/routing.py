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
and applies all E experts to every token as one (E*r) x d_out map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lily.errors import MergeError

ROUTING_MODES = ("batch", "sample", "token", "static", "uniform")
DATA_DEPENDENT = ("batch", "sample", "token")
MERGEABLE = ("static", "uniform")


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
    num_B, d_out, r = experts.shape
    if mode == "sample":  # one mix per example, applied by one batched matmul
        examples = base.shape[0] if base.dim() > 1 else 1
        if mask is not None and (base.dim() != 3 or mask.shape != base.shape[:2]):
            mask = None
        mixed = mix_experts(expert_weights(mode, h, router, num_B, mask, examples), experts)
        out = torch.baddbmm(base.reshape(examples, -1, d_out), h.view(examples, -1, r), mixed.mT, alpha=alpha)
        return out.view(base.shape)
    if mode == "token":  # h scaled by each expert's weight; all E experts applied as one (E*r) x d_out map
        weights = expert_weights(mode, h, router, num_B)
        hidden = (weights.unsqueeze(-1) * h.unsqueeze(-2)).view(-1, num_B * r)
        up = experts.permute(1, 0, 2).reshape(d_out, num_B * r)  # copied in r-long runs, far cheaper than B^T's
    elif mode == "uniform":  # the experts' mean: their sum, 1/E folded into alpha
        hidden, up, alpha = h, experts.sum(dim=0), alpha / num_B
    else:  # "batch", "static": one mix per call
        hidden, up = h, mix_experts(expert_weights(mode, h, router, num_B), experts)
    return torch.addmm(base.reshape(-1, d_out), hidden, up.t(), alpha=alpha).view(base.shape)
