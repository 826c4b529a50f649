"""Fine-tuning methods: Lily, LoRA (PEFT) at Lily's parameter budget, PEFT's own Lily, PEFT's VeRA (a shared-parameter
peer), full fine-tuning, head only.

Every method also trains the task head fully (a new classification head must learn), so the methods
differ only in how the backbone is adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lily
from lily.budget import fit_budget, lily_parameters, lora_parameters_per_rank, matched_lora_rank
from lily.distributed import assign, full_tensor, reshard
from lily.plan import TargetType, layer_kind, longest_suffix, plan_targets
from lily.train.config import TrainConfig

TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("c_attn",), ("q", "v"))
TRAINED_FILE = "trained.safetensors"
PEFT_METHODS = ("lora", "peft-lily", "peft-vera")
"""Methods that PEFT applies and saves (`save_pretrained` / `PeftModel.from_pretrained`)."""


@dataclass
class MethodInfo:
    trainable: int
    """Every trainable parameter (adapter + head)."""
    adapter: int
    """Trainable parameters outside the head."""
    head: int
    lily_budget: int
    """Lily's adapter count for the same targets (the budget LoRA is matched to)."""
    lora_r: int
    """The LoRA rank used (method lora) or matched to Lily's budget (other methods)."""
    lora_params: int
    """LoRA's adapter count at `lora_r` on the same targets."""


def default_targets(model: nn.Module) -> list[str]:
    """The attention query and value projections under whatever names the architecture uses."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if layer_kind(m) is not None}
    for candidate in TARGET_CANDIDATES:
        if all(c in leaves for c in candidate):
            return list(candidate)
    raise lily.TargetError(
        "could not find attention query/value layers to adapt in this model; pass --targets with module-name suffixes."
    )


def pick_alternatives(model: nn.Module, entries: list[str]) -> list[str]:
    """Each entry as given, or for 'a|b|...' the first alternative that names a module of `model` (a suffix; for
    a parallel 'source>sink' entry, its source). Recipes use this to fit several architectures."""
    names = [name for name, _ in model.named_modules() if name]
    picked = []
    for entry in entries:
        options = entry.split("|")
        found = [o for o in options if any(longest_suffix(n, [o.partition(">")[0]]) for n in names)]
        if len(options) > 1 and not found:
            raise lily.TargetError(f"none of the alternatives {options} names a module of this model.")
        picked.append(found[0] if len(options) > 1 else entry)
    return picked


def lily_config(cfg: TrainConfig, model: nn.Module, head: list[str]) -> lily.LilyConfig:
    """The run's LilyConfig; with --budget or --budget-lora-rank, r is the largest that fits the budget."""
    targets = pick_alternatives(model, cfg.targets) if cfg.targets else default_targets(model)
    fields = dict(
        target_modules=targets, num_A=cfg.num_A, num_B=cfg.num_B, scaling=cfg.scaling, routing=cfg.routing,
        dropout=cfg.adapter_dropout, trainable_modules=head, init=cfg.lily_init,
        router_init_scale=cfg.router_init_scale, parallel_modules=pick_alternatives(model, cfg.parallel_modules or []),
        parallel_r=cfg.parallel_r,
    )  # fmt: skip
    if cfg.budget is None and cfg.budget_lora_rank is None:
        return lily.LilyConfig(r=cfg.r, **fields)
    try:
        return fit_budget(model, budget=cfg.budget, like_lora_rank=cfg.budget_lora_rank, **fields)
    except lily.ConfigError as exc:
        raise lily.ConfigError(f"--budget/--budget-lora-rank: {exc}") from None


def apply_method(cfg: TrainConfig, model: nn.Module, head: list[str]) -> tuple[nn.Module, MethodInfo]:
    """Make `model` trainable the way `cfg.method` says; returns the (possibly wrapped) model and its counts."""
    config = lily_config(cfg, model, head)
    targets = config.target_modules
    budget, per_rank = lily_parameters(model, config), lora_parameters_per_rank(model, config)
    lora_r = cfg.lora_r or matched_lora_rank(budget, per_rank)
    if cfg.method == "lily":
        lily.inject(model, config)
    elif cfg.method in PEFT_METHODS:
        from peft import LilyConfig, LoraConfig, VeraConfig, get_peft_model

        if cfg.method == "lora":
            peft_config = LoraConfig(r=lora_r, lora_alpha=cfg.lora_alpha or 2 * lora_r, target_modules=targets,
                                     lora_dropout=cfg.adapter_dropout, modules_to_save=head or None)  # fmt: skip
        elif cfg.method == "peft-vera":
            convs = [t.target for t in plan_targets(model, config) if t.kernel_size]
            if convs:
                raise lily.ConfigError(f"--method peft-vera: PEFT's VeRA adapts Linear layers only, not the convs "
                                       f"{convs}; choose Linear --targets.")  # fmt: skip
            peft_config = VeraConfig(r=cfg.vera_r, target_modules=targets, vera_dropout=cfg.adapter_dropout,
                                     projection_prng_key=cfg.seed, modules_to_save=head or None)  # fmt: skip
        else:
            stride = peft_stride(plan_targets(model, config), config.num_A)
            peft_config = LilyConfig(r=config.r, stride_A=stride, num_B=config.num_B,
                                     scaling=config.scaling, target_modules=targets,
                                     modules_to_save=head or None)  # fmt: skip
        model = get_peft_model(model, peft_config)
    else:
        model.requires_grad_(cfg.method == "full")
        for name in head:
            model.get_submodule(name).requires_grad_(True)
    head_params = {id(p) for n, p in model.named_parameters() if p.requires_grad and _in_head(n, head)}
    trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    head_count = sum(n for i, n in trainable.items() if i in head_params)
    adapter = sum(trainable.values()) - head_count
    info = MethodInfo(sum(trainable.values()), adapter, head_count, budget, lora_r, lora_r * per_rank)
    return model, info


def peft_stride(plan: list[TargetType], num_A: int) -> int:
    """PEFT Lily's stride_A that makes the same A groups as Lily's `num_A` on every target type; ConfigError if none."""
    for stride in sorted({math.ceil(t.num_layers / num_A) for t in plan}):
        if all(list(t.groups) == [i // stride for i in range(t.num_layers)] for t in plan):
            return stride
    counts = sorted({t.num_layers for t in plan})
    raise lily.ConfigError(
        f"--method peft-lily: PEFT's Lily groups layers in runs of one length (stride_A), which cannot make --num-A "
        f"{num_A} groups of {'/'.join(map(str, counts))} layers as Lily does; choose a --num-A that divides the layer "
        "count."
    )


UP_PROJECTIONS = (".lora_B.", ".lily_B.", ".lily_router.", ".vera_lambda_b.")
"""Name parts of PEFT's up-projections and routers (LoRA's B; PEFT Lily's B experts and routers; VeRA's output
scales)."""


def up_projections(model: nn.Module) -> set[int]:
    """ids of the parameters --lr-ratio-B scales: Lily's B experts and routers, or PEFT's LoRA B / Lily B and
    router / VeRA output scales."""
    if lily.adapter.find_adapters(model) is not None:
        named = lily.adapter_parameters(model).items()
        return {id(p) for n, p in named if n.endswith((".B", ".router"))}
    return {id(p) for n, p in model.named_parameters() if any(part in n for part in UP_PROJECTIONS)}


def _in_head(param_name: str, head: list[str]) -> bool:
    parts = param_name.split(".")
    return any(h in parts for h in head)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by parameter name (what a checkpoint must hold to resume)."""
    return {n: full_tensor(p).to("cpu").contiguous() for n, p in reshard(model).named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(reshard(model).named_parameters())
    for name, tensor in state.items():
        assign(params[name], tensor)


def save_trained(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    """The trained weights in the method's own format: a Lily adapter, a PEFT adapter, or the trainable tensors."""
    if cfg.method == "lily":
        lily.save_adapter(model, directory)
    elif cfg.method in PEFT_METHODS:
        model.save_pretrained(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), directory / TRAINED_FILE)


def load_trained(model: nn.Module, cfg: TrainConfig, directory: Path, head: list[str]) -> nn.Module:
    """A base model with the weights `save_trained` wrote; returns the (possibly wrapped) model."""
    if cfg.method == "lily":
        return lily.load_adapter(model, directory)
    if cfg.method in PEFT_METHODS:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory)
    model, _ = apply_method(cfg, model, head)
    load_trainable_state(model, load_file(directory / TRAINED_FILE))
    return model


def restore_trained(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    """Copy the weights `save_trained` wrote into `model`, which already has the method applied."""
    if cfg.method == "lily":
        lily.load_adapter_weights(model, directory)
    elif cfg.method in PEFT_METHODS:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
    else:
        load_trainable_state(model, load_file(directory / TRAINED_FILE))
