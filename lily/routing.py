r"""Routing: from a layer's low-rank hidden h = x A_g^T to its mixture of the B experts.

Notation: h has one row per position, (tokens, r); the router R_l (E x r, one per layer) gives per-token
probabilities p = softmax(h R_l^T) over the E experts; the layer's update is delta = sum_e w_e (h B_e^T).

===========  ==========================================================  ==========================
mode         expert weights w                                            properties
===========  ==========================================================  ==========================
"batch"      mean of p over the batch AND the tokens: one w per layer    the paper's code exactly;
             per forward call                                            couples examples in a batch
"sample"     mean of p over one example's tokens (positions where the    batch- and padding-invariant;
             model's ``attention_mask`` is 0 are left out, see           pooled over future tokens
             `position_weights`)
"token"      p itself: every token mixes the experts its own way         leak-free for causal models
"static"     softmax of a learned per-layer logit vector (E values)      input-independent: mergeable
"uniform"    1/E for every expert (the paper's "monoscale")              mergeable; zero-initialised
                                                                         experts stay identical
===========  ==========================================================  ==========================

`add_experts` adds the update to the base layer's output in one matmul per layer. Pooled modes mix the
experts first: one d_out x r map per layer ("batch", "static", "uniform") or per example ("sample", a
batched matmul), costing about what LoRA's up-projection costs. "token" scales h by each expert's weight
and applies all E experts to every token as one (E*r) x d_out map. The maps of "token" and "uniform" are the
same for every layer of a target type (`expert_matrix`), so a caller may compute them once per forward.
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
SHARED_MAP = ("token", "uniform")
"""Modes whose map of the experts is the same for every layer of a target type (`expert_matrix`)."""


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


def position_weights(mask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """How "sample" routing averages an example's positions, from an attention `mask` (examples, positions):
    1/n at each of the example's n positions where the mask is nonzero, 0 elsewhere."""
    keep = mask.to(device, dtype)
    return keep / keep.sum(dim=1, keepdim=True).clamp_min(1.0)


def expert_weights(
    mode: str,
    h: torch.Tensor,
    router: torch.Tensor | None,
    num_B: int,
    pool: torch.Tensor | None = None,
    examples: int = 1,
) -> torch.Tensor:
    """Expert weights for hidden `h` (tokens, r).

    Shapes: (E,) for "batch", "static" and "uniform"; (examples, E) for "sample", whose tokens are `examples`
    runs of equally many positions; (tokens, E) for "token". "static" and "uniform" read only the device and
    dtype of `h`. `pool` (examples, positions; `position_weights`), used by "sample" only, weighs the
    positions of each example (default: their mean).
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
    if pool is None:
        return per_position.mean(dim=1)
    return torch.bmm(pool.to(probs).unsqueeze(1), per_position).squeeze(1)


def mix_experts(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_e w_e B_e for weights (..., E) and experts (E, d_out, r): one matmul, shape (..., d_out, r)."""
    num_B, d_out, r = experts.shape
    mixed = torch.mm(weights.reshape(-1, num_B), experts.reshape(num_B, d_out * r))
    return mixed.view(*weights.shape[:-1], d_out, r)


def expert_matrix(mode: str, experts: torch.Tensor, alpha: float) -> torch.Tensor:
    """The map a `SHARED_MAP` mode applies to every layer's h, from the experts (E, d_out, r) and the scale alpha
    alone: for "token" alpha times all E experts side by side, (d_out, E*r), expert-major along the columns; for
    "uniform" alpha times their mean, (d_out, r). (A scale here, once per forward, spares every layer's backward
    two multiplications.)"""
    num_B, d_out, r = experts.shape
    # "token": copied in r-long runs, far cheaper than B^T's
    up = experts.permute(1, 0, 2).reshape(d_out, num_B * r) if mode == "token" else experts.mean(dim=0)
    return up if alpha == 1.0 else up * alpha


def add_experts(
    mode: str,
    base: torch.Tensor,
    h: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    alpha: float,
    pool: torch.Tensor | None = None,
    shared_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + alpha * sum_e w_e (h B_e^T): the update of hidden h (tokens, r) added to `base` by one matmul.

    `base` (..., d_out) is the layer's output, features last, one position per row of h. For "sample" its first
    dim counts the examples, and `pool` (examples, positions; `position_weights`) weighs the positions when it
    has base's leading shape (else they count equally). `experts` is (E, d_out, r); `shared_map`, for "token" and
    "uniform", is their `expert_matrix` for alpha if the caller has it.
    """
    num_B, d_out, r = experts.shape
    if mode == "sample":  # one mix per example, applied by one batched matmul
        examples = base.shape[0] if base.dim() > 1 else 1
        if pool is not None and (base.dim() != 3 or pool.shape != base.shape[:2]):
            pool = None
        mixed = mix_experts(expert_weights(mode, h, router, num_B, pool, examples), experts)
        out = torch.baddbmm(base.reshape(examples, -1, d_out), h.view(examples, -1, r), mixed.mT, alpha=alpha)
        return out.view(base.shape)
    hidden = h
    if mode == "token":  # h scaled by each expert's weight; all E experts applied as one (E*r) x d_out map
        weights = expert_weights(mode, h, router, num_B)
        hidden = (weights.unsqueeze(-1) * h.unsqueeze(-2)).view(-1, num_B * r)
    if mode in SHARED_MAP:  # "token", "uniform": the map holds alpha
        up, alpha = expert_matrix(mode, experts, alpha) if shared_map is None else shared_map, 1.0
    else:  # "batch", "static": one mix per call
        up = mix_experts(expert_weights(mode, h, router, num_B), experts)
    return torch.addmm(base.reshape(-1, d_out), hidden, up.t(), alpha=alpha).view(base.shape)
