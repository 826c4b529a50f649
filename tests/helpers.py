"""Tiny random models built from configs, a straightforward reference implementation of Lily's formula, and a
two-process launcher."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import transformers
from torch import nn

import lily

# family -> (builder, Lily target suffixes)
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc"],
}


def tiny_llama(num_layers: int = 4) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(num_layers: int = 4) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_roberta(num_layers: int = 4) -> nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=72, num_labels=2, pad_token_id=1,
    )  # fmt: skip
    return transformers.RobertaForSequenceClassification(cfg).eval()


def tiny_vit(num_layers: int = 4) -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg).eval()


def tiny_gpt2(num_layers: int = 4) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=num_layers, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "roberta": tiny_roberta, "vit": tiny_vit, "gpt2": tiny_gpt2}


def model_inputs(family: str, batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 64, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mlp_stack(width: int = 16, depth: int = 6) -> nn.Sequential:
    """A plain nn.Module stack: depth x (Linear, Tanh)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


def randomize_adapter(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every adapter parameter random values (B starts at zero, which would hide the maths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lily.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def reference_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    experts: torch.Tensor,
    router: torch.Tensor | None,
    mode: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lily's update for input x (batch, tokens, d_in) written out with loops, one expert at a time.

    a: (r, d_in); experts: (E, d_out, r); router: (E, r), (E,) for "static", None for "uniform".
    """
    num_experts = experts.shape[0]
    h = x @ a.T
    per_expert = [h @ experts[e].T for e in range(num_experts)]  # each (batch, tokens, d_out)
    out = torch.zeros_like(per_expert[0])
    if mode in ("uniform", "static", "batch"):
        if mode == "uniform":
            w = torch.full((num_experts,), 1.0 / num_experts, dtype=x.dtype)
        elif mode == "static":
            w = torch.softmax(router, dim=0)
        else:
            w = torch.softmax(h @ router.T, dim=-1).reshape(-1, num_experts).mean(dim=0)
        for e in range(num_experts):
            out += w[e] * per_expert[e]
        return out
    probs = torch.softmax(h @ router.T, dim=-1)  # (batch, tokens, E)
    if mode == "token":
        for e in range(num_experts):
            out += probs[..., e : e + 1] * per_expert[e]
        return out
    assert mode == "sample"
    for b in range(x.shape[0]):
        keep = torch.ones(x.shape[1], dtype=torch.bool) if mask is None else mask[b].bool()
        w = probs[b][keep].mean(dim=0)
        for e in range(num_experts):
            out[b] += w[e] * per_expert[e][b]
    return out


def reference_layer(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """base(x) + s * reference_delta for one adapted layer, from its own parameters."""
    branch = layer.adapters[layer.active]
    bank = branch.bank
    delta = reference_delta(x, bank.A[branch.group], bank.B, branch.router, branch.routing, mask)
    return layer.base_layer(x) + branch.scaling * delta


def capture_layer_io(model: nn.Module, **inputs) -> list[tuple[object, torch.Tensor, torch.Tensor]]:
    """Run the model once and record (layer, input, output) for every adapted layer."""
    records = []
    handles = [
        layer.register_forward_hook(lambda mod, args, out: records.append((mod, args[0], out)))
        for _, layer in lily.lily_layers(model)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return records


def model_state(model: nn.Module) -> tuple:
    """Everything a failed lily call must leave unchanged: module tree and types, every tensor and its
    requires_grad, hooks, and the adapters with the active one."""
    modules = [(name, type(m).__name__) for name, m in model.named_modules(remove_duplicate=False)]
    tensors = {name: (t.detach().clone(), t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()}
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    adapters = getattr(model, "lily_adapters", None)
    names = (list(adapters), adapters.active) if adapters is not None else None
    return modules, tensors, hooks, names


def assert_same_state(before: tuple, after: tuple) -> None:
    assert after[0] == before[0], "module tree changed"
    assert after[1].keys() == before[1].keys(), "tensors added or removed"
    for name, (tensor, grad) in before[1].items():
        assert torch.equal(after[1][name][0], tensor) and after[1][name][1] == grad, name
    assert after[2] == before[2], "hooks changed"
    assert after[3] == before[3], "adapters changed"


def exit_worker() -> None:
    """End a torchrun worker whose work is done without interpreter finalization. With torch 2.13 a gloo thread
    may still be freeing a finished collective (a DDP gradient all-reduce kept by the last barrier) whose captured
    thread-local state holds a Python object; once finalization has begun that thread cannot take the GIL, and
    the process aborts ("terminate called without an active exception") although every result is written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(*args: str) -> None:
    """Run `torchrun --nproc_per_node 2 ARGS` (gloo on CPU) and assert that it succeeded. With `--standalone` the
    processes rendezvous on a free local port, not 29500, so no leftover process or other job can join them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
