r"""Routing: from a layer's low-rank hidden h = x A_g^T to its mixture of the B experts.

Notation: h has shape (..., r); the router R_l (E x r, one per layer) gives per-token probabilities
p = softmax(h R_l^T) over the E experts; the layer's update is delta = sum_e w_e (h B_e^T).

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

Pooled modes mix the experts once per layer ("batch") or once per example ("sample") and then apply
one r x d_out map, costing about what LoRA's up-projection costs. "token" applies all E experts to
every token as one (E*r) x d_out matmul.
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
    mode: str, r: int, num_B: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> nn.Parameter | None:
    """The per-layer routing parameter of `mode`.

    Data-dependent modes: a bias-free linear map r -> E (E x r), kaiming-uniform like `nn.Linear(r, E)`.
    "static": E logits drawn from N(0, 1). Zero logits would give every layer the same uniform mix and
    zero-initialised experts identical gradients forever (the "uniform" collapse); distinct per-layer
    mixes let the experts drift apart. "uniform": no parameter.
    """
    if mode in DATA_DEPENDENT:
        weight = nn.Parameter(torch.empty(num_B, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        return weight
    if mode == "static":
        return nn.Parameter(torch.randn(num_B, device=device, dtype=dtype))
    return None


def _sample_view(h: torch.Tensor) -> torch.Tensor:
    """h as (examples, positions, r); a 1-D h is one example with one position."""
    if h.dim() == 1:
        return h.reshape(1, 1, -1)
    return h.reshape(h.shape[0], -1, h.shape[-1])


def expert_weights(
    mode: str, h: torch.Tensor, router: torch.Tensor | None, num_B: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Expert weights for hidden `h` (..., r).

    Shapes: (E,) for "batch", "static" and "uniform"; (examples, E) for "sample"; (..., E) for "token".
    "static" and "uniform" read only the device and dtype of `h`.
    `mask` (examples, positions), used by "sample" only, marks the positions that count.
    """
    if mode == "uniform":
        return torch.full((num_B,), 1.0 / num_B, device=h.device, dtype=h.dtype)
    if mode == "static":
        return torch.softmax(router, dim=-1)
    probs = torch.softmax(F.linear(h, router), dim=-1)
    if mode == "token":
        return probs
    if mode == "batch":
        return probs.reshape(-1, num_B).mean(dim=0)
    per_position = _sample_view(probs)
    if mask is None or h.dim() != 3 or mask.shape != h.shape[:2]:
        return per_position.mean(dim=1)
    keep = mask.to(per_position.dtype).unsqueeze(-1)
    return (per_position * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def mix_experts(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_e w_e B_e for weights (..., E) and experts (E, d_out, r): one matmul, shape (..., d_out, r)."""
    num_B, d_out, r = experts.shape
    return (weights @ experts.reshape(num_B, d_out * r)).reshape(*weights.shape[:-1], d_out, r)


def apply_experts(mode: str, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e w_e (h B_e^T) for experts (E, d_out, r) and weights from `expert_weights`; returns (..., d_out)."""
    num_B, d_out, r = experts.shape
    if mode == "token":
        mixed_hidden = (weights.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (..., E*r)
        return F.linear(mixed_hidden, experts.permute(1, 0, 2).reshape(d_out, num_B * r))
    if mode == "sample":
        per_example = mix_experts(weights, experts).to(h.dtype)  # (examples, d_out, r)
        out = torch.bmm(_sample_view(h), per_example.transpose(1, 2))
        return out.reshape(*h.shape[:-1], d_out)
    return F.linear(h, mix_experts(weights, experts))
