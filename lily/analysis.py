"""Diagnostics of a trained adapter: the rank of each layer's update, how alike the B experts are, and
how the routers spread their weight.

    stats = lily.routing_statistics(model, batches)   # run real inputs through the model
    report = lily.diagnostics(model, stats)           # per-layer ranks, per-type expert similarity

For data-dependent routing a layer's update depends on the input; its *typical* update uses the layer's
mean expert weights over the batches given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lily.adapter import branches, get_adapter, lily_layers
from lily.layer import LilyBranch, LilyLayer
from lily.routing import DATA_DEPENDENT, expert_weights


def effective_rank(matrix: torch.Tensor, tolerance: float = 1e-3) -> dict[str, float]:
    """Ranks of a matrix from its singular values s.

    "entropy": exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); "numerical": #{s > tolerance * max s}.
    """
    s = torch.linalg.svdvals(matrix.double())
    if s.max() <= 0:
        return {"entropy": 0.0, "numerical": 0.0}
    p = s / s.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"entropy": math.exp(entropy), "numerical": float((s > tolerance * s.max()).sum().item())}


def expert_similarity(experts: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity (E x E) of the flattened B experts (E, d_out, r)."""
    flat = F.normalize(experts.detach().flatten(1).double(), dim=1)
    return flat @ flat.T


def expert_diversity(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """A differentiable penalty on alike B experts: the mean squared off-diagonal cosine similarity of each target
    type's experts, averaged over types (0: mutually orthogonal, 1: parallel). Add `weight * expert_diversity(model)`
    to the loss to push the experts apart; zero experts (the "lora" init's start) count as orthogonal.
    """
    penalties = []
    for bank in get_adapter(model, name).banks.values():
        if bank.num_B < 2:
            continue
        flat = F.normalize(bank.B.flatten(1), dim=1)
        gram = flat @ flat.T
        off = ~torch.eye(bank.num_B, dtype=torch.bool, device=gram.device)
        penalties.append(gram[off].square().mean())
    return torch.stack(penalties).mean() if penalties else torch.zeros(())


@torch.no_grad()
def routing_statistics(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per adapted layer: mean expert weights over all tokens seen, and the mean entropy (nats) of the per-token
    router distributions (data-dependent routing only; the maximum is log(num_B)).

    `batches` are keyword-argument dicts for `model(**batch)`.
    """
    totals: dict[str, dict[str, Any]] = {}

    def hook(name: str, branch: LilyBranch):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            num_B = branch.bank.num_B
            h, _ = branch.low_rank(args[0], module.down)
            probs = expert_weights("token", h, branch.router, num_B).reshape(-1, num_B).double()  # per token
            entry = totals.setdefault(name, {"weights": 0.0, "entropy": 0.0, "tokens": 0})
            entry["weights"] = entry["weights"] + probs.sum(0)
            entry["entropy"] += -(probs * probs.clamp_min(1e-30).log()).sum().item()
            entry["tokens"] += probs.shape[0]

        return record

    layers = {n: layer for n, layer in lily_layers(model) if isinstance(layer, LilyLayer)}  # not parallel slots
    handles = [layers[n].register_forward_hook(hook(n, branch))
               for n, branch in branches(model) if branch.routing in DATA_DEPENDENT and n in layers]  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        name: {"mean_weights": (t["weights"] / t["tokens"]).tolist(), "entropy": t["entropy"] / t["tokens"]}
        for name, t in totals.items()
    }


def layer_update(branch: LilyBranch, weights: torch.Tensor) -> torch.Tensor:
    """s * B~ A (d_out x d_in) of one layer's branch for expert weights `weights` (E,)."""
    up, down = branch.update_factors(weights)
    return up @ down


def diagnostics(model: nn.Module, statistics: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-layer effective ranks of the (typical) update and router entropy; per-type expert similarity.

    Data-dependent layers need `statistics` from `routing_statistics`; without them they use uniform weights.
    """
    adapter = get_adapter(model)
    statistics = statistics or {}
    layers = []
    for name, layer in branches(model):
        num_B = layer.bank.num_B
        if layer.routing in DATA_DEPENDENT:
            stats = statistics.get(name)
            weights = torch.tensor(stats["mean_weights"]) if stats else torch.full((num_B,), 1.0 / num_B)
            entropy = stats["entropy"] if stats else None
        else:
            weights, entropy = layer.fixed_weights().detach(), None
        layers.append({
            "layer": name, "group": layer.group, "expert_weights": [round(w, 4) for w in weights.tolist()],
            "router_entropy": entropy, "max_entropy": math.log(num_B),
            **{f"rank_{k}": v for k, v in effective_rank(layer_update(layer, weights)).items()},
        })  # fmt: skip
    similarity = {}
    for key, bank in adapter.banks.items():
        sim = expert_similarity(bank.B)
        off = sim[~torch.eye(len(sim), dtype=torch.bool)]
        similarity[key] = {"matrix": sim.tolist(), "mean_off_diagonal": off.mean().item() if off.numel() else 1.0}
    return {"routing": adapter.routing, "r": adapter.config.r, "layers": layers, "expert_similarity": similarity}
