"""PEFT interoperability: export an adapter as a PEFT Lily checkpoint (`to_peft`) and import one (`from_peft`).

PEFT's `LilyConfig` (peft >= 0.18) covers a subset of ours: "batch" routing, nn.Linear targets, A groups of
`stride_A` consecutive layers, and sharing keyed by (matched target suffix or regex, weight shape). Its
checkpoint stores every layer's A, B and router (shared tensors repeated per layer) under
`base_model.model.<layer>.lily_{A,B,router}.weight`, with B as a (num_B * r, d_out) matrix.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lily.adapter import branches, get_adapter, module_parameters
from lily.config import LilyConfig
from lily.errors import CheckpointError
from lily.io import CONFIG_NAME, WEIGHTS_NAME, atomic_writes, inject_then_load, read_adapter_tensors
from lily.plan import TargetType

PREFIX = "base_model.model."
UNSUPPORTED_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


Layout = list[tuple[str, int, int]]
"""(layer name, target type id, A group) per layer."""


def _partitions(layers: Layout) -> tuple[set[frozenset[str]], set[frozenset[str]]]:
    """(sets of layers sharing an A, sets of layers sharing the B experts)."""
    share_a: dict[tuple[int, int], set[str]] = {}
    share_b: dict[int, set[str]] = {}
    for name, type_id, group in layers:
        share_a.setdefault((type_id, group), set()).add(name)
        share_b.setdefault(type_id, set()).add(name)
    return {frozenset(s) for s in share_a.values()}, {frozenset(s) for s in share_b.values()}


def _ours(plan: list[TargetType]) -> Layout:
    return [(n, i, g) for i, t in enumerate(plan) for n, g in zip(t.module_names, t.groups, strict=True)]


def _peft_layout(plan: list[TargetType], order: list[str], targets: list[str] | str, stride: int) -> Layout:
    """How PEFT's Lily groups the same layers: by (last target suffix the name ends with, or the regex; shape)
    in module order, A groups of `stride` consecutive layers."""
    shape = {n: (t.in_features, t.out_features) for t in plan for n in t.module_names}
    keys: dict[tuple, int] = {}
    count: dict[tuple, int] = {}
    rows = []
    for name in order:
        suffix = targets if isinstance(targets, str) else [s for s in targets if name.endswith(s)][-1]
        key = (suffix, shape[name])
        type_id = keys.setdefault(key, len(keys))
        index = count[key] = count.get(key, -1) + 1
        rows.append((name, type_id, index // stride))
    return rows


def _expressible(plan: list[TargetType], order: list[str], targets: list[str] | str, stride: int) -> bool:
    return _partitions(_ours(plan)) == _partitions(_peft_layout(plan, order, targets, stride))


def to_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Write adapter `name` of `model` (default: the active one) as a PEFT Lily checkpoint in directory `path`,
    loadable with `peft.PeftModel.from_pretrained(base_model, path)`.

    Raises CheckpointError naming the feature when the adapter is not expressible in PEFT's Lily: routing
    other than "batch", Conv1D layers, A groups that are not runs of one fixed length, or sharing that PEFT
    would key differently. Dropout has no PEFT field; it is dropped with a warning (inference is unchanged).
    """
    adapter = get_adapter(model, name)
    cfg = adapter.config
    if adapter.routing != "batch":
        raise CheckpointError(
            f"to_peft: PEFT's Lily routes by the batch mean only; adapter {adapter.name!r} uses "
            f"routing={adapter.routing!r}. Train with LilyConfig(routing='batch') to export."
        )
    parallel = [t.target for t in adapter.plan if t.placement == "parallel"]
    if parallel:
        raise CheckpointError(
            f"to_peft: PEFT's Lily has no parallel adapters; adapter {adapter.name!r} has {parallel}."
        )
    layers = dict(branches(model, adapter.name))
    named = dict(model.named_modules())
    conv = [n for n in layers if named[n].kind != "linear"]
    if conv:
        raise CheckpointError(f"to_peft: PEFT's Lily adapts only nn.Linear; '{conv[0]}' is a transformers Conv1D.")
    order = list(layers)
    candidates = sorted({t.group_sizes()[0] for t in adapter.plan if t.num_A > 1}) or [
        max(t.num_layers for t in adapter.plan)
    ]
    stride = next((s for s in candidates if _expressible(adapter.plan, order, cfg.target_modules, s)), None)
    if stride is None:
        sizes = {t.key: t.group_sizes() for t in adapter.plan}
        raise CheckpointError(
            f"to_peft: PEFT's Lily needs A groups of one fixed length (stride_A) and shares by target suffix "
            f"and shape; adapter {adapter.name!r} has group sizes {sizes} for target_modules "
            f"{cfg.target_modules!r}. Use LilyConfig(layers_per_A=...) with a list of target suffixes."
        )
    if cfg.dropout > 0:
        warnings.warn(f"to_peft: PEFT's Lily has no dropout; dropout={cfg.dropout} is not exported.", stacklevel=2)

    tensors: dict[str, torch.Tensor] = {}
    for t in adapter.plan:
        bank = adapter.banks[t.key]
        b = bank.B.detach().transpose(1, 2).reshape(bank.num_B * bank.r, bank.out_features)
        for layer_name, group in zip(t.module_names, t.groups, strict=True):
            key = f"{PREFIX}{layer_name}"
            tensors[f"{key}.lily_A.weight"] = bank.A[group].detach()
            tensors[f"{key}.lily_B.weight"] = b
            tensors[f"{key}.lily_router.weight"] = layers[layer_name].router.detach()
    for param_name, param in module_parameters(model, adapter.name).items():
        tensors[PREFIX + param_name] = param.detach()
    tensors = {k: v.to("cpu").clone().contiguous() for k, v in tensors.items()}  # one storage per key
    config = {
        "peft_type": "LILY", "task_type": None, "inference_mode": True, "auto_mapping": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None, "r": cfg.r, "stride_A": stride, "num_B": cfg.num_B, "scaling": cfg.scaling,
        "target_modules": cfg.target_modules, "exclude_modules": None,
        "modules_to_save": list(cfg.trainable_modules) or None, "layers_to_transform": None,
        "layers_pattern": None, "init_weights": True,
    }  # fmt: skip
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_writes(directory, {
        WEIGHTS_NAME: lambda temp: save_file(tensors, temp, metadata={"format": "pt"}),
        CONFIG_NAME: lambda temp: Path(temp).write_text(json.dumps(config, indent=2) + "\n"),
    })  # fmt: skip


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `adapter_config.json` of a PEFT Lily checkpoint, checked for the fields lily can express."""
    file = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read a PEFT config at '{file}': {exc}") from exc
    if not isinstance(meta, dict) or meta.get("peft_type") != "LILY":
        kind = meta.get("peft_type") if isinstance(meta, dict) else None
        raise CheckpointError(f"'{file}' is not a PEFT Lily checkpoint (peft_type={kind!r}, expected 'LILY').")
    for field in UNSUPPORTED_PEFT_FIELDS:
        if meta.get(field) not in (None, [], ""):
            raise CheckpointError(f"from_peft: the PEFT Lily option {field}={meta[field]!r} is not supported by lily.")
    return meta


def from_peft(path: str | os.PathLike, model: nn.Module, name: str = "default") -> nn.Module:
    """Import the PEFT Lily checkpoint in directory `path` onto base `model` as adapter `name` ("batch" routing,
    PEFT's `stride_A` as `layers_per_A`), keeping one copy of each shared tensor; returns `model`.

    Every per-layer copy of a shared A or B in the file must be identical; a checkpoint whose sharing lily
    cannot express, or whose tensors do not fit, raises CheckpointError and leaves the model as it was.
    """
    meta = read_peft_config(path)
    tensors = read_adapter_tensors(path)
    lily_keys = (".lily_A.weight", ".lily_B.weight", ".lily_router.weight")
    stray = [k for k in tensors if not k.startswith(PREFIX)]
    if stray:
        raise CheckpointError(f"from_peft: '{stray[0]}' in '{path}' is not a PEFT model key ('{PREFIX}...').")
    modules = sorted({k[len(PREFIX) :].rsplit(".", 1)[0] for k in tensors if not k.endswith(lily_keys)})
    config = LilyConfig(
        target_modules=meta["target_modules"], r=meta["r"], layers_per_A=meta["stride_A"], num_B=meta["num_B"],
        scaling=meta["scaling"], routing="batch", trainable_modules=modules,
    )  # fmt: skip
    inject_then_load(model, config, name, lambda: _load_peft_tensors(model, name, tensors, meta, str(path)), str(path))
    return model


def _load_peft_tensors(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str
) -> None:
    adapter = get_adapter(model, name)
    layers = dict(branches(model, name))
    if not _expressible(adapter.plan, list(layers), meta["target_modules"], meta["stride_A"]):
        raise CheckpointError(
            f"from_peft: the checkpoint at '{where}' shares A/B by target_modules={meta['target_modules']!r} and "
            "shape across modules that lily keeps apart (a regex spanning several projections); not expressible."
        )

    def tensor(key: str) -> torch.Tensor:
        if PREFIX + key not in tensors:
            raise CheckpointError(f"from_peft: tensor '{PREFIX + key}' is missing from the checkpoint at '{where}'.")
        return tensors[PREFIX + key]

    def shared(keys: list[str]) -> torch.Tensor:
        first = tensor(keys[0])
        for key in keys[1:]:
            if not torch.equal(tensor(key), first):
                raise CheckpointError(
                    f"from_peft: '{PREFIX + key}' differs from '{PREFIX + keys[0]}' in '{where}', but Lily shares "
                    "them; the checkpoint's tensors are not shared."
                )
        return first

    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in adapter.plan:
        bank = adapter.banks[t.key]
        for g in range(t.num_A):
            members = [n for n, group in zip(t.module_names, t.groups, strict=True) if group == g]
            loaded[f"banks.{t.key}.A.{g}"] = (bank.A[g], shared([f"{n}.lily_A.weight" for n in members]))
        b = shared([f"{n}.lily_B.weight" for n in t.module_names])
        if b.shape != (bank.num_B * bank.r, bank.out_features):
            raise CheckpointError(f"from_peft: B of '{t.key}' has shape {tuple(b.shape)} in '{where}', expected "
                                  f"{(bank.num_B * bank.r, bank.out_features)}.")  # fmt: skip
        loaded[f"banks.{t.key}.B"] = (bank.B, b.reshape(bank.num_B, bank.r, bank.out_features).transpose(1, 2))
    for layer_name, branch in layers.items():
        loaded[layer_name] = (branch.router, tensor(f"{layer_name}.lily_router.weight"))
    for param_name, param in module_parameters(model, name).items():
        loaded[param_name] = (param, tensor(param_name))
    for key, (param, value) in loaded.items():
        if tuple(param.shape) != tuple(value.shape):
            raise CheckpointError(f"from_peft: '{key}' has shape {tuple(value.shape)} in '{where}' but "
                                  f"{tuple(param.shape)} in the model.")  # fmt: skip
    with torch.no_grad():
        for param, value in loaded.values():
            param.copy_(value)
