"""Save and load adapters: `lily_config.json` plus `lily_adapter.safetensors`, one copy of each tensor.

Format version 2. `lily_config.json` holds the `LilyConfig`, the layer plan, the routing reason, the base
model's name, revision and class, the lily version, and the sha256 and size of the weights file it belongs to: it
is the commit record of a save. A save writes both files to temporary files (fsynced), renames the weights
file into place, then the config, and fsyncs the directory. A crash between the two renames leaves the new
config pending under its temporary name; loading then finds the config whose checksum matches the weights
(the pending one), and the next save commits it before it starts. So a crash at any point leaves the old
adapter or the new one, never a mix. Version 1 folders (`adapter_config.json` + `adapter_model.safetensors`,
without checksum) still load.

A load reads and checks everything (config fields, plan, tensor names, shapes and dtypes from the safetensors
header, checksum) before it changes or allocates anything on the model; a failure leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from lily.adapter import (
    FILE_PREFIX,
    LilyAdapter,
    adapter_parameters,
    find_adapters,
    get_adapter,
    lily_layers,
    module_parameters,
    original_module,
    saved_parameters,
    set_adapter,
)
from lily.bank import LilyBank
from lily.config import LilyConfig
from lily.distributed import any_sharded, assign, full_tensor, is_main_process, reshard
from lily.durable import fsync_dir, temp_name, write_new
from lily.errors import CheckpointError, LilyError
from lily.inject import delete_adapter, inject, resolve_routing
from lily.layer import SLOT_ATTR, LilyLayer
from lily.plan import TargetType, plan_targets, plan_trainable_modules
from lily.routing import make_router

CONFIG_NAME = "lily_config.json"
WEIGHTS_NAME = "lily_adapter.safetensors"
V1_CONFIG_NAME = "adapter_config.json"
V1_WEIGHTS_NAME = "adapter_model.safetensors"
"""File names of format version 1 (read only; they are PEFT's names, so version 2 has its own)."""
FORMAT = "lily-adapter"
FORMAT_VERSION = 2
TEMP_PREFIX = ".lily_tmp."
"""Temporary files of a save are `<TEMP_PREFIX><file name>.<random>.tmp` in the adapter directory."""
MAX_CONFIG_BYTES = 64 << 20
"""A larger config file is refused unread."""

_OPTIONAL_STR = (str, type(None))
SCHEMA: dict[int, dict[str, type | tuple[type, ...]]] = {
    1: {"format": str, "format_version": int, "config": dict, "routing_reason": str, "target_types": list},
    2: {"format": str, "format_version": int, "lily_version": str, "base_model_name_or_path": _OPTIONAL_STR,
        "base_model_revision": _OPTIONAL_STR, "base_model_class": _OPTIONAL_STR, "config": dict,
        "routing_reason": str, "target_types": list, "weights": dict},
}  # fmt: skip
"""The fields of the config file of each format version and their JSON types."""
WEIGHTS_SCHEMA: dict[str, type | tuple[type, ...]] = {"sha256": str, "size": int}


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter directory whose config file was read and checked (its tensors not yet read)."""

    config_file: Path
    weights_file: Path
    meta: dict[str, Any]
    """The config file's fields (see SCHEMA)."""
    config: LilyConfig

    @property
    def checksum(self) -> dict[str, Any] | None:
        """{"sha256", "size"} of the weights file (None for format version 1, which has no checksum)."""
        return self.meta.get("weights")


def base_model_id(model: nn.Module) -> tuple[str | None, str | None]:
    """(name or path, revision) of the pretrained model `model` was loaded from, where its config records them."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None)
    revision = getattr(config, "_commit_hash", None) or getattr(config, "revision", None)
    return (str(name) if name else None), (str(revision) if revision else None)


def base_model_class(model: nn.Module) -> str | None:
    """The transformers class name of `model` (e.g. "LlamaForCausalLM"), or None for other modules."""
    modeling = sys.modules.get("transformers.modeling_utils")  # a model can only be one if transformers is loaded
    return type(model).__name__ if modeling is not None and isinstance(model, modeling.PreTrainedModel) else None


def _checksum(source: bytes | Path) -> dict[str, Any]:
    """{"sha256": hex digest, "size": bytes} of `source` (a file is read in chunks)."""
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
        return {"sha256": digest.hexdigest(), "size": len(source)}
    size = 0
    with source.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> content) into `directory`, all or nothing; they are renamed into place in order.

    Each file is written to a temporary file and fsynced; the directory is fsynced, the temporary files are
    renamed in order, and the directory is fsynced again. Temporary files of an earlier interrupted write of
    these names are removed first. An error before the first rename removes every temporary file and leaves
    the directory as it was (a directory this call created is removed); after it, the remaining temporary
    files stay for `read_adapter` to recover from and the next write removes them.
    """
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        for stale in directory.glob(f"{TEMP_PREFIX}{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    temps = {name: temp_name(directory / name, TEMP_PREFIX) for name in files}
    renamed = False
    try:
        for name, data in files.items():
            write_new(temps[name], data)
        fsync_dir(directory)
        for name, temp in temps.items():
            os.replace(temp, directory / name)
            renamed = True
        fsync_dir(directory)
    except BaseException:
        if not renamed:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            if created and not any(directory.iterdir()):
                directory.rmdir()
        raise


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter `name` of `model` (default: the active one) to directory `path`: `lily_config.json` +
    `lily_adapter.safetensors`.

    Only adapter tensors are written, each shared A group and B expert once. The save is all-or-nothing: a
    failure or crash at any point leaves the previous adapter in `path` or the new one (see the module
    docstring). Under FSDP2 (`fully_shard`), call it on every rank: the shards are gathered and rank 0
    writes (`load_adapter_weights` likewise loads into shards). With `state_dict` (a full state dict of the
    model, as Trainer gathers under FSDP or DeepSpeed; wrapper prefixes such as `_orig_mod.` or `module.`
    are allowed) the values are read from it instead of the model, and nothing is gathered.

    Example:
        >>> lily.save_adapter(model, "out/adapter")
    """
    from lily import __version__  # the package imports this module

    model = original_module(model)
    adapter = get_adapter(model, name)
    if state_dict is not None:
        tensors = _values_from(model, adapter.name, state_dict)
    else:
        params = saved_parameters(reshard(model), adapter.name)
        tensors = {n: full_tensor(p).to("cpu").contiguous() for n, p in params.items()}
        if any_sharded(params.values()) and not is_main_process():
            return  # FSDP2: every rank gathered the shards above; rank 0 writes
    weights = safetensors.torch.save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    base, revision = base_model_id(model)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lily_version": __version__,
        "base_model_name_or_path": base,
        "base_model_revision": revision,
        "base_model_class": base_model_class(model),
        "config": adapter.config.to_dict(),
        "routing_reason": adapter.routing_reason,
        "target_types": [t.to_dict() for t in adapter.plan],
        "weights": _checksum(weights),
    }
    directory = Path(path)
    _finish_interrupted_save(directory)
    write_files(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: (json.dumps(meta, indent=2) + "\n").encode()})
    _remove_v1_files(directory)


WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")
"""Prefixes that torch.compile, DDP and FSDP put before parameter names in a wrapper's state dict."""


def _unprefixed(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _values_from(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` by file name, read from `state_dict` (by model parameter name)."""
    by_name = {_unprefixed(k): v for k, v in state_dict.items()}
    by_param = {id(p): n for n, p in {**adapter_parameters(model, name), **module_parameters(model, name)}.items()}
    tensors = {}
    for file_name, param in saved_parameters(model, name).items():
        model_name = by_param[id(param)]
        if model_name not in by_name:
            raise CheckpointError(
                f"save_adapter: the state_dict passed lacks the adapter tensor '{model_name}'; pass the model's "
                "full state dict, or none to read the model."
            )
        tensors[file_name] = by_name[model_name].detach().to("cpu").contiguous()
    return tensors


def _finish_interrupted_save(directory: Path) -> None:
    """Commit the pending config of a save interrupted between its two renames, so that removing that save's
    temporary files keeps the adapter a load finds there."""
    if not _pending_configs(directory):
        return
    try:
        found = read_adapter(directory)
    except CheckpointError:
        return  # nothing loadable to keep
    if found.config_file.name.startswith(TEMP_PREFIX):
        os.replace(found.config_file, directory / CONFIG_NAME)
        fsync_dir(directory)


def _remove_v1_files(directory: Path) -> None:
    """Remove the version 1 files of an adapter the save just replaced (PEFT's files stay)."""
    legacy = directory / V1_CONFIG_NAME
    try:
        meta = read_json(legacy)
    except CheckpointError:
        return
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        (directory / V1_WEIGHTS_NAME).unlink(missing_ok=True)
        legacy.unlink()


def _pending_configs(directory: Path) -> list[Path]:
    """Config files of interrupted saves, newest first."""
    return sorted(directory.glob(f"{TEMP_PREFIX}{CONFIG_NAME}.*.tmp"), key=lambda p: p.stat().st_mtime, reverse=True)


def require_regular_file(file: Path) -> None:
    """Raise CheckpointError unless `file` is a regular file (a FIFO or a device would block or never end)."""
    if not file.is_file():
        what = "missing" if not file.exists() else "not a regular file"
        raise CheckpointError(f"{file} is {what}; an adapter's files are regular files.")


def read_json(file: Path) -> Any:
    """The JSON in regular file `file`, at most MAX_CONFIG_BYTES long; CheckpointError otherwise."""
    require_regular_file(file)
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{file} is larger than {MAX_CONFIG_BYTES} bytes; it is not a lily adapter config.")
        return json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and Unicode errors
        raise CheckpointError(f"{file} is corrupt or truncated: {exc}.") from exc


def _check_version(meta: Any, file: Path, expected: int) -> None:
    """Raise CheckpointError unless `meta` is a lily adapter config of format version `expected`."""
    if isinstance(meta, dict) and "peft_type" in meta:
        raise CheckpointError(
            f"{file} is a PEFT checkpoint (peft_type={meta['peft_type']!r}), not a lily adapter; import a PEFT Lily "
            "checkpoint with lily.from_peft(path, model)."
        )
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{file} is not a lily adapter config (it lacks "format": "{FORMAT}").')
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} was written by a newer lily (format_version {version}; this lily reads versions 1 to "
            f"{FORMAT_VERSION}); upgrade lily to load it."
        )
    if version != expected:
        raise CheckpointError(f"{file} has format_version {version!r}; files named {file.name} are version {expected}.")


def _check_fields(data: dict[str, Any], schema: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Raise CheckpointError naming the first missing, unknown or mistyped field of `data`."""
    missing = [k for k in schema if k not in data]
    unknown = sorted(set(data) - set(schema))
    problems = [f"missing field(s) {missing}"] if missing else []
    problems += [f"unknown field(s) {unknown}"] if unknown else []
    if problems:
        raise CheckpointError(f"{where} is not a valid lily adapter config: {'; '.join(problems)}. Save it again.")
    for key, kind in schema.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(data[key], kinds) or (isinstance(data[key], bool) and bool not in kinds):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in kinds)
            raise CheckpointError(f"{where}: field '{key}' must be {names}, got {type(data[key]).__name__}.")


def _read_config(file: Path, version: int) -> dict[str, Any]:
    """The fields of config file `file` of format `version`, each checked; CheckpointError names the one at fault."""
    meta = read_json(file)
    _check_version(meta, file, version)
    _check_fields(meta, SCHEMA[version], str(file))
    if "weights" in meta:
        _check_fields(meta["weights"], WEIGHTS_SCHEMA, f"{file} (weights)")
        if not re.fullmatch("[0-9a-f]{64}", meta["weights"]["sha256"]):
            raise CheckpointError(f"{file}: field 'weights.sha256' must be 64 lowercase hex digits.")
    if not all(isinstance(t, dict) for t in meta["target_types"]):
        raise CheckpointError(f"{file}: field 'target_types' must be a list of objects.")
    return meta


def _find_config(directory: Path) -> tuple[Path, dict[str, Any], Path]:
    """(config file, its checked fields, weights file) of the adapter saved in `directory`.

    The committed `lily_config.json` when the weights match its checksum, else the newest pending config (of a
    save interrupted between its renames) that they match, else a version 1 config.
    """
    committed, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    pending = _pending_configs(directory)
    checksum = _checksum(weights) if weights.is_file() and (committed.is_file() or pending) else None
    if committed.is_file():
        meta = _read_config(committed, FORMAT_VERSION)
        if meta["weights"] == checksum:
            return committed, meta, weights
    for file in pending:
        try:
            meta = _read_config(file, FORMAT_VERSION)
        except CheckpointError:
            continue  # a config the crash cut short
        if meta["weights"] == checksum:
            return file, meta, weights
    if committed.is_file():
        if checksum is None:
            raise CheckpointError(f"{weights} is missing beside {committed}; the adapter is incomplete. Save it again.")
        raise CheckpointError(
            f"interrupted save: {weights} does not match the sha256 and size recorded in {committed} (a save was "
            "cut short or a file was replaced); save the adapter again."
        )
    legacy = directory / V1_CONFIG_NAME
    if legacy.is_file():
        return legacy, _read_config(legacy, 1), directory / V1_WEIGHTS_NAME
    raise CheckpointError(f"no adapter at '{directory}': {CONFIG_NAME} is missing (save one with lily.save_adapter).")


def read_adapter(path: str | os.PathLike) -> SavedAdapter:
    """The adapter saved in directory `path` (format version 1 or 2), its config file read and every field checked.

    Raises CheckpointError naming the file and field at fault.
    """
    config_file, meta, weights_file = _find_config(Path(path))
    try:
        config = LilyConfig.from_dict(meta["config"])
    except LilyError as exc:
        raise CheckpointError(f"the adapter config in {config_file} is invalid: {exc}") from exc
    return SavedAdapter(config_file, weights_file, meta, config)


def read_safetensors(file: Path, checksum: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `file`, whose bytes must match `checksum` when one is given.

    The file is read once, so the tensors are the bytes that were checked. A missing, corrupt or truncated file
    raises CheckpointError.
    """
    require_regular_file(file)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the adapter weights {file}: {exc}.") from exc
    if checksum is not None and _checksum(data) != checksum:
        raise CheckpointError(f"{file} changed while it was being loaded (its sha256 no longer matches); load again.")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{file} is corrupt or truncated and cannot be read: {exc}.") from exc
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor '{key}' has dtype {tensor.dtype}; adapter tensors are floating point."
            )
    return tensors


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in directory `path`, checked against its config's checksum."""
    saved = read_adapter(path)
    return read_safetensors(saved.weights_file, saved.checksum)


def _is_float(dtype: str) -> bool:
    """Whether a safetensors dtype name ("F32", "BF16", "F8_E4M3", "I64", ...) is a floating-point type."""
    return dtype.startswith("F") or dtype == "BF16"


def _check_header(file: Path, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Check the names, shapes and dtypes of the tensors in `file` from its header alone (no tensor data)."""
    require_regular_file(file)
    try:
        with safe_open(file, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            header = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except Exception as exc:  # a missing file, or a damaged header: safetensors raises several types
        raise CheckpointError(f"{file} is missing, corrupt or truncated and cannot be read: {exc}.") from exc
    check_shapes(expected, {key: shape for key, (shape, _) in header.items()}, where)
    for key, (_, dtype) in header.items():
        if not _is_float(dtype):
            raise CheckpointError(
                f"adapter at '{where}': tensor '{key}' has dtype {dtype} in the file; adapter tensors are "
                "floating point."
            )


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError unless `found` has exactly the tensor names and shapes of `expected`."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"adapter at '{where}' does not fit this model: tensors missing from the file {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, tensors in the file the model has no place for "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
        )
    for key, shape in expected.items():
        if found[key] != shape:
            raise CheckpointError(
                f"adapter at '{where}' does not fit this model: tensor '{key}' has shape {found[key]} in the file "
                f"but {shape} in the model."
            )


def _check_plan(saved: list[dict[str, Any]], plan: list[TargetType], where: str) -> None:
    """Raise CheckpointError naming the first target type and field where the saved plan differs from `plan`."""
    planned = [t.to_dict() for t in plan]
    for s, p in zip(saved, planned, strict=False):
        if s != p:
            field = next(k for k in [*p, *s] if s.get(k) != p.get(k))
            raise CheckpointError(
                f"adapter at '{where}' does not fit this model: target type '{p['key']}' has {field}="
                f"{s.get(field)!r} in the file but {p.get(field)!r} in the model."
            )
    if len(saved) != len(planned):
        raise CheckpointError(
            f"adapter at '{where}' was saved for {len(saved)} target type(s), the model has {len(planned)}."
        )


def expected_tensors(
    model: nn.Module, config: LilyConfig, where: str
) -> tuple[list[TargetType], dict[str, tuple[int, ...]]]:
    """The plan `config` gives on `model`, and the file name and shape of every tensor its adapter holds.

    Nothing is allocated and the model is not touched: the shapes come from banks and routers on the meta
    device. Targets that do not fit the model raise CheckpointError.
    """
    try:
        plan = plan_targets(model, config)
        trainable = plan_trainable_modules(model, config, plan)
    except LilyError as exc:
        raise CheckpointError(f"adapter at '{where}' does not fit this model: {exc}") from exc
    routing, _ = resolve_routing(model, config)
    wrapped = {n for n, site in lily_layers(model) if isinstance(site, LilyLayer)}
    wrapped |= {n for t in plan if t.placement == "layer" for n in t.module_names}
    meta = torch.device("meta")
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan:
        bank = LilyBank(t.in_features, t.out_features, t.r, t.num_A, config.num_B, t.kernel_size, device=meta)
        shapes.update({f"{FILE_PREFIX}.banks.{t.key}.{n}": tuple(p.shape) for n, p in bank.named_parameters()})
        router = make_router(routing, t.r, config.num_B, device=meta)
        for module in t.module_names if router is not None else ():
            site = module  # a parallel adapter's slot sits on the sink's base module
            if t.placement == "parallel":
                site = f"{module}.base_layer.{SLOT_ATTR}" if module in wrapped else f"{module}.{SLOT_ATTR}"
            shapes[f"{site}.router"] = tuple(router.shape)
    for module in trainable:
        shapes.update({f"{module}.{n}": tuple(p.shape) for n, p in model.get_submodule(module).named_parameters()})
    return plan, shapes


def copy_tensors(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into `params` (same names), after checking that every name and shape agrees."""
    check_shapes({k: tuple(p.shape) for k, p in params.items()}, {k: tuple(t.shape) for k, t in tensors.items()}, where)
    for key, param in params.items():
        assign(param, tensors[key])


def check_free_name(model: nn.Module, name: str, where: str) -> None:
    """Raise CheckpointError if `model` already has an adapter called `name`."""
    present = find_adapters(model)
    if present is not None and name in present:
        raise CheckpointError(
            f"cannot load the adapter at '{where}' as {name!r}: the model already has an adapter named {name!r}; "
            f"pass another name or call lily.delete_adapter(model, {name!r}) first."
        )


def inject_then_load(model: nn.Module, config: LilyConfig, name: str, load: Callable[[], None], where: str) -> None:
    """Inject `config` as adapter `name` and run `load` to fill it; on any error take it off again and leave the
    model as it was (the previously active adapter active again)."""
    present = find_adapters(model)
    previous = present.active if present is not None else None
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


HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, V1_CONFIG_NAME, V1_WEIGHTS_NAME, "README.md"]
"""The files of an adapter repository on the Hugging Face Hub that a load downloads."""
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
"""What a Hub repository id looks like ('name' or 'org/name')."""


def adapter_dir(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the adapter `path`: `path` itself when it is a directory, else the snapshot of
    Hugging Face Hub repository `path` at `revision`, downloaded or (offline, `HF_HUB_OFFLINE=1`) read from the
    local cache."""
    local = Path(path)
    if local.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub repositories; '{path}' is a local directory.")
        return local
    repo = str(path)
    if not REPO_ID.fullmatch(repo):
        raise CheckpointError(f"no adapter at '{path}': no such directory (nor a Hub repository id 'org/name').")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, library_name="lily"))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"no adapter at '{repo}': no such directory, and as a Hub repository it is not in the local Hub cache "
            "and the Hub cannot be reached; download it once while online (HF_HUB_OFFLINE=1 forbids downloads)."
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(
            f"no adapter at '{repo}': no such directory, and the Hub answers: {str(exc).splitlines()[0]}"
        ) from exc


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Inject the adapter saved at `path` (a directory, or a Hugging Face Hub repo id at `revision`) into `model`
    as adapter `name`, make it active, load its weights, and return `model`. The model may already carry other
    adapters.

    The adapter is frozen, for inference, and stays frozen when `lily.set_adapter` activates it again;
    `is_trainable=True` keeps its parameters (and its trainable modules) trainable, to continue training.
    Everything is checked before the model is touched: the config, the plan against the model's modules, every
    tensor's name, shape and dtype, and the weights' checksum. On any error the model is left as it was.

    Example:
        >>> model = lily.load_adapter(AutoModelForCausalLM.from_pretrained(base_id), "out/adapter")
    """
    given, model, where = model, original_module(model), str(path)
    saved = read_adapter(adapter_dir(path, revision))
    check_free_name(model, name, where)
    plan, expected = expected_tensors(model, saved.config, where)
    _check_plan(saved.meta["target_types"], plan, where)
    _check_header(saved.weights_file, expected, where)
    tensors = read_safetensors(saved.weights_file, saved.checksum)

    def fill() -> None:
        params = saved_parameters(model, name)
        copy_tensors(params, tensors, where)
        for param in params.values():
            param.requires_grad_(is_trainable)
        adapter = get_adapter(model, name)
        adapter.routing_reason, adapter.inference_mode = saved.meta["routing_reason"], not is_trainable

    inject_then_load(model, saved.config, name, fill, where)
    return given


def _check_same_config(saved: LilyConfig, adapter: LilyAdapter, where: str) -> None:
    for f in fields(LilyConfig):
        theirs, ours = getattr(saved, f.name), getattr(adapter.config, f.name)
        if theirs != ours:
            raise CheckpointError(
                f"adapter at '{where}' was saved with {f.name}={theirs!r}, but adapter {adapter.name!r} has "
                f"{f.name}={ours!r}; load_adapter_weights needs the same config (add the saved one as another "
                "adapter with lily.load_adapter)."
            )


def load_adapter_weights(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Copy the tensors saved at `path` into adapter `name` of `model` (default: the active one), which already
    has the same config.

    The whole config, the layer plan, every tensor's name, shape and dtype and the checksum are checked first,
    and the adapter must not be merged; nothing is copied on a mismatch.
    """
    model, where = original_module(model), str(path)
    adapter = get_adapter(model, name)
    saved = read_adapter(adapter_dir(path))
    _check_same_config(saved.config, adapter, where)
    merged = [n for n, site in lily_layers(model) if site.merged == adapter.name]
    if merged:
        raise CheckpointError(
            f"adapter {adapter.name!r} is merged into the weights of '{merged[0]}'; call lily.unmerge(model) "
            "before loading weights into it."
        )
    _check_plan(saved.meta["target_types"], adapter.plan, where)
    params = saved_parameters(reshard(model), adapter.name)
    _check_header(saved.weights_file, {k: tuple(p.shape) for k, p in params.items()}, where)
    copy_tensors(params, read_safetensors(saved.weights_file, saved.checksum), where)
