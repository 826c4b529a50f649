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

import safetensors.torch
import torch
from torch import nn

from lily.adapter import FILE_PREFIX, branches, get_adapter, module_parameters, saved_parameters
from lily.config import LilyConfig
from lily.errors import CheckpointError, LilyError
from lily.io import (
    base_model_id,
    check_free_name,
    check_shapes,
    copy_tensors,
    expected_tensors,
    inject_then_load,
    read_json,
    read_safetensors,
    write_files,
)
from lily.plan import TargetType, base_modules

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
"""PEFT's file names (lily's own adapters use `lily.io.CONFIG_NAME` and `WEIGHTS_NAME`)."""
PREFIX = "base_model.model."
UNSUPPORTED_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")
REQUIRED_PEFT_FIELDS = ("target_modules", "r", "stride_A", "num_B", "scaling")


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
    other than "batch", num_B=1 (PEFT refuses it), Conv1D and Conv2d layers, A groups that are not runs of one fixed
    length, a layer name that ends with two target suffixes (PEFT's choice would depend on the hash seed), or
    sharing that PEFT would key differently. The files are written all-or-nothing. Dropout has no PEFT field;
    it is dropped with a warning (inference is unchanged).
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
    if cfg.num_B < 2:
        raise CheckpointError(
            f"to_peft: PEFT's Lily refuses num_B={cfg.num_B} (\"`num_B` must be at least 2 for the router to be "
            'trained"); train with LilyConfig(num_B=2) or more to export.'
        )
    layers = dict(branches(model, adapter.name))
    named = dict(model.named_modules())
    conv = [n for n in layers if named[n].kind != "linear"]
    if conv:
        kind = {"conv1d": "a transformers Conv1D", "conv2d": "an nn.Conv2d"}[named[conv[0]].kind]
        raise CheckpointError(
            f"to_peft: PEFT's Lily adapts only nn.Linear; '{conv[0]}' is {kind}, which it has no layer for. Save "
            "the adapter with lily.save_adapter instead."
        )
    order = list(layers)
    for layer_name in order if isinstance(cfg.target_modules, list) else ():
        hits = [s for s in cfg.target_modules if layer_name.endswith(s)]
        if len(hits) > 1:
            raise CheckpointError(
                f"to_peft: PEFT's Lily shares by the target that a module name ends with as a plain string, taken "
                f"from a set: '{layer_name}' ends with each of {hits}, so PEFT's sharing would depend on "
                "PYTHONHASHSEED. Use target suffixes none of which ends another (e.g. 'SelfAttention.o' for 'o')."
            )
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
    base, revision = base_model_id(model)
    config = {
        "peft_type": "LILY", "task_type": None, "inference_mode": True, "auto_mapping": None,
        "base_model_name_or_path": base, "revision": revision, "r": cfg.r, "stride_A": stride, "num_B": cfg.num_B,
        "scaling": cfg.scaling,
        "target_modules": cfg.target_modules, "exclude_modules": None,
        "modules_to_save": list(cfg.trainable_modules) or None, "layers_to_transform": None,
        "layers_pattern": None, "init_weights": True,
    }  # fmt: skip
    write_files(Path(path), {
        PEFT_WEIGHTS_NAME: safetensors.torch.save(tensors, metadata={"format": "pt"}),
        PEFT_CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
    })  # fmt: skip


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `adapter_config.json` of a PEFT Lily checkpoint, checked for the fields lily needs and can express."""
    file = Path(path) / PEFT_CONFIG_NAME
    meta = read_json(file)
    if not isinstance(meta, dict) or meta.get("peft_type") != "LILY":
        kind = meta.get("peft_type") if isinstance(meta, dict) else None
        raise CheckpointError(f"'{file}' is not a PEFT Lily checkpoint (peft_type={kind!r}, expected 'LILY').")
    missing = [field for field in REQUIRED_PEFT_FIELDS if field not in meta]
    if missing:
        raise CheckpointError(f"from_peft: '{file}' lacks the field(s) {missing} of a PEFT Lily config.")
    for field in UNSUPPORTED_PEFT_FIELDS:
        if meta.get(field) not in (None, [], ""):
            raise CheckpointError(f"from_peft: the PEFT Lily option {field}={meta[field]!r} is not supported by lily.")
    saved = meta.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved)):
        raise CheckpointError(f"from_peft: '{file}' has modules_to_save={saved!r}; expected a list of names or null.")
    return meta


def _modules_to_save(model: nn.Module, suffixes: list[str]) -> list[str]:
    """The outermost modules PEFT's `modules_to_save` selects: names ending with an entry (as a plain string, as
    PEFT matches them). Entries that select nothing are ignored, as PEFT does (it adds 'classifier' and
    'score' to every sequence classifier)."""
    names = [n for n, _ in base_modules(model) if n and any(n.endswith(s) for s in suffixes)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def from_peft(path: str | os.PathLike, model: nn.Module, name: str = "default") -> nn.Module:
    """Import the PEFT Lily checkpoint in directory `path` onto base `model` as adapter `name` ("batch" routing,
    PEFT's `stride_A` as `layers_per_A`, `modules_to_save` as `trainable_modules`), keeping one copy of each
    shared tensor; returns `model`.

    Everything is checked before the model is touched: every per-layer copy of a shared A or B in the file must
    be identical, and every tensor must be a Lily tensor of an adapted layer or belong to a `modules_to_save`
    module. A checkpoint whose sharing lily cannot express, or whose tensors do not fit, raises CheckpointError
    and leaves the model as it was.
    """
    where = str(path)
    meta = read_peft_config(path)
    tensors = read_safetensors(Path(path) / PEFT_WEIGHTS_NAME)
    check_free_name(model, name, where)
    stray = [k for k in tensors if not k.startswith(PREFIX)]
    if stray:
        raise CheckpointError(f"from_peft: '{stray[0]}' in '{path}' is not a PEFT model key ('{PREFIX}...').")
    try:
        config = LilyConfig(
            target_modules=meta["target_modules"], r=meta["r"], layers_per_A=meta["stride_A"], num_B=meta["num_B"],
            scaling=meta["scaling"], routing="batch",
            trainable_modules=_modules_to_save(model, meta.get("modules_to_save") or []),
        )  # fmt: skip
    except LilyError as exc:
        raise CheckpointError(f"from_peft: the PEFT config at '{where}' is invalid: {exc}") from exc
    plan, expected = expected_tensors(model, config, where)
    adapted = {n for t in plan for n in t.module_names}
    order = [n for n, _ in base_modules(model) if n in adapted]
    if not _expressible(plan, order, meta["target_modules"], meta["stride_A"]):
        raise CheckpointError(
            f"from_peft: the checkpoint at '{where}' shares A/B by target_modules={meta['target_modules']!r} and "
            "shape across modules that lily keeps apart (a regex spanning several projections); not expressible."
        )
    values = _lily_tensors(plan, config, tensors, where)
    check_shapes(expected, {k: tuple(v.shape) for k, v in values.items()}, where)
    inject_then_load(model, config, name, lambda: copy_tensors(saved_parameters(model, name), values, where), where)
    return model


def _lily_tensors(
    plan: list[TargetType], config: LilyConfig, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The PEFT checkpoint's tensors under lily's adapter-file names, one copy of each shared tensor.

    Raises CheckpointError for a missing tensor, per-layer copies of a shared tensor that differ, and tensors
    that are neither Lily tensors of an adapted layer nor parameters of a `modules_to_save` module.
    """
    used: set[str] = set()

    def tensor(key: str) -> torch.Tensor:
        if PREFIX + key not in tensors:
            raise CheckpointError(f"from_peft: tensor '{PREFIX + key}' is missing from the checkpoint at '{where}'.")
        used.add(PREFIX + key)
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

    values: dict[str, torch.Tensor] = {}
    for t in plan:
        for g in range(t.num_A):
            members = [n for n, group in zip(t.module_names, t.groups, strict=True) if group == g]
            values[f"{FILE_PREFIX}.banks.{t.key}.A.{g}"] = shared([f"{n}.lily_A.weight" for n in members])
        b = shared([f"{n}.lily_B.weight" for n in t.module_names])
        if tuple(b.shape) != (config.num_B * t.r, t.out_features):
            raise CheckpointError(f"from_peft: B of '{t.key}' has shape {tuple(b.shape)} in '{where}', expected "
                                  f"{(config.num_B * t.r, t.out_features)}.")  # fmt: skip
        values[f"{FILE_PREFIX}.banks.{t.key}.B"] = b.reshape(config.num_B, t.r, t.out_features).transpose(1, 2)
        for layer_name in t.module_names:
            values[f"{layer_name}.router"] = tensor(f"{layer_name}.lily_router.weight")
    for module in config.trainable_modules:
        for key in tensors:
            if key.startswith(f"{PREFIX}{module}."):
                values[key[len(PREFIX) :]] = tensor(key[len(PREFIX) :])
    unused = sorted(tensors.keys() - used)
    if unused:
        raise CheckpointError(
            f"from_peft: '{unused[0]}' in '{where}' is neither a Lily tensor of an adapted layer nor a parameter of a "
            f"modules_to_save module ({config.trainable_modules}); the checkpoint does not fit this model."
        )
    return values
