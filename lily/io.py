"""Save and load adapters: a JSON config plus one safetensors file with one copy of each tensor."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lily.adapter import find_adapters, get_adapter, saved_parameters, set_adapter
from lily.config import LilyConfig
from lily.distributed import any_sharded, assign, full_tensor, is_main_process, reshard
from lily.errors import CheckpointError, LilyError
from lily.inject import delete_adapter, inject

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "lily-adapter"
FORMAT_VERSION = 1


def atomic_writes(directory: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write each named file through a temporary file in `directory`, then rename them all into place.

    If any writer fails, every temporary file is deleted and no target file is touched.
    """
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temps[name] = temp
            write(temp)
        for name, temp in temps.items():
            os.replace(temp, directory / name)
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Write adapter `name` of `model` (default: the active one) to directory `path`: `adapter_config.json` +
    `adapter_model.safetensors`.

    Only adapter tensors are written, each shared A group and B expert once. Files are written
    atomically: a failed save leaves no partial file. Under FSDP2 (`fully_shard`), call it on every rank:
    the shards are gathered and rank 0 writes (`load_adapter_weights` likewise loads into shards).

    Example:
        >>> lily.save_adapter(model, "out/adapter")
    """
    adapter = get_adapter(model, name)
    params = saved_parameters(reshard(model), adapter.name)
    tensors = {n: full_tensor(p).to("cpu").contiguous() for n, p in params.items()}
    if any_sharded(params.values()) and not is_main_process():
        return  # FSDP2: every rank gathered the shards above; rank 0 writes
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": adapter.config.to_dict(),
        "routing_reason": adapter.routing_reason,
        "target_types": [t.to_dict() for t in adapter.plan],
    }
    directory = Path(path)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)

    def write_config(temp: str) -> None:
        Path(temp).write_text(json.dumps(meta, indent=2) + "\n")

    def write_weights(temp: str) -> None:
        save_file(tensors, temp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})

    try:
        atomic_writes(directory, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})
    except BaseException:
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `adapter_config.json` of an adapter directory, checked for format."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"no adapter at '{path}': {CONFIG_NAME} is missing (save one with lily.save_adapter).")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated: {exc}.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{file} is not a lily adapter config (missing "format": "{FORMAT}").')
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format_version {meta.get('format_version')!r}; this lily reads version {FORMAT_VERSION}."
        )
    for key in ("config", "target_types"):
        if key not in meta:
            raise CheckpointError(f"{file} lacks the '{key}' entry; the file is incomplete.")
    return meta


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`; corrupt or truncated files raise CheckpointError."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"no adapter weights at '{path}': {WEIGHTS_NAME} is missing.")
    try:
        with safe_open(file, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{file} is corrupt or truncated and cannot be read: {exc}.") from exc


def _check_fits(
    model: nn.Module, name: str | None, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> None:
    params = saved_parameters(model, name)
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"adapter at '{where}' does not fit this model: tensors missing from the file {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, tensors in the file the model has no place for "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
        )
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"adapter at '{where}' does not fit this model: tensor '{key}' has shape "
                f"{tuple(tensors[key].shape)} in the file but {tuple(param.shape)} in the model."
            )
    saved = meta["target_types"]
    planned = [t.to_dict() for t in get_adapter(model, name).plan]
    if saved != planned:
        for s, p in zip(saved, planned, strict=False):
            if s != p:
                field = next(k for k in s if s.get(k) != p.get(k))
                raise CheckpointError(
                    f"adapter at '{where}' does not fit this model: target type '{s.get('key')}' has "
                    f"{field}={s.get(field)!r} in the file but {p.get(field)!r} in the model."
                )
        raise CheckpointError(
            f"adapter at '{where}' was saved for {len(saved)} target type(s), the model has {len(planned)}."
        )


def load_adapter_weights(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Copy the tensors saved at `path` into adapter `name` of `model` (default: the active one), which already
    has the same config.

    The file's layer plan and every tensor's name and shape are checked first; nothing is copied on a mismatch.
    """
    _copy_checked(model, name, read_adapter_config(path), read_adapter_tensors(path), str(path))


def _copy_checked(
    model: nn.Module, name: str | None, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> None:
    _check_fits(reshard(model), name, meta, tensors, where)
    for key, param in saved_parameters(model, name).items():
        assign(param, tensors[key])


def inject_then_load(model: nn.Module, config: LilyConfig, name: str, load: Callable[[], None], where: str) -> None:
    """Inject `config` as adapter `name` and run `load` to fill it; on any error take it off again and leave the
    model as it was (the previously active adapter active again)."""
    present = find_adapters(model)
    previous = present.active if present is not None else None
    if present is not None and name in present:
        raise CheckpointError(
            f"cannot load the adapter at '{where}' as {name!r}: the model already has an adapter named {name!r}; "
            f"pass another name or call lily.delete_adapter(model, {name!r}) first."
        )
    try:
        inject(model, config, name)
    except LilyError as exc:
        raise CheckpointError(f"adapter at '{where}' does not fit this model: {exc}") from exc
    try:
        load()
    except BaseException:
        delete_adapter(model, name)
        if previous is not None:
            set_adapter(model, previous)
        raise


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Inject the adapter saved at `path` into `model` as adapter `name`, make it active, load its weights, and
    return `model`. The model may already carry other adapters.

    On any error the model is left as it was.

    Example:
        >>> model = lily.load_adapter(AutoModelForCausalLM.from_pretrained(base_id), "out/adapter")
    """
    meta = read_adapter_config(path)
    tensors = read_adapter_tensors(path)  # a corrupt or truncated file fails here, before the model is touched
    try:
        config = LilyConfig.from_dict(meta["config"])
    except (LilyError, TypeError) as exc:
        raise CheckpointError(f"adapter config at '{path}' is invalid: {exc}") from exc
    inject_then_load(model, config, name, lambda: _copy_checked(model, name, meta, tensors, str(path)), str(path))
    if "routing_reason" in meta:
        get_adapter(model, name).routing_reason = meta["routing_reason"]
    return model
