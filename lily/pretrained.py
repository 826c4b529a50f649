"""transformers models that carry a Lily adapter: their `save_pretrained`/`push_to_hub`, Trainer checkpoints, merged
export, and loading base model + adapter from an adapter folder or Hub repo alone.

Why instance attributes and guarded Trainer methods: transformers saves every model, Trainer checkpoints
and uploads through `model.save_pretrained`, so `lily.inject` gives an injected `PreTrainedModel` its own
`save_pretrained` and `push_to_hub` (small callable objects, so the model still pickles and deep-copies).
They write the adapter only, in lily's format, so no folder holds base weights under renamed keys that
`from_pretrained` would silently replace by random ones. Trainer's *loading* (resume, best model) has no
hook and knows only full models and PEFT's `PeftModel`; the first injection therefore adds a guard to
`Trainer._load_from_checkpoint`, `Trainer._load_best_model` and `Trainer.create_model_card`: when the
trainer's model carries a Lily adapter and the folder holds a lily adapter, lily loads it (and keeps the card
lily's); otherwise the original method runs unchanged. No user code is needed beyond `lily.inject`. If
`transformers.trainer` is not imported yet, the guard is added when it is: importing it at injection would
cost seconds and pull in peft and bitsandbytes, which may reach the Hub for kernels.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lily import hub
from lily.adapter import (
    MODEL_INTEGRATIONS,
    find_adapters,
    lily_layers,
    original_module,
)
from lily.errors import CheckpointError
from lily.io import (
    CONFIG_NAME,
    V1_CONFIG_NAME,
    adapter_dir,
    load_adapter,
    load_adapter_weights,
    read_adapter,
    save_adapter,
)
from lily.layer import LilyLayer
from lily.merge import require_mergeable


def _pretrained_class() -> type | None:
    module = sys.modules.get("transformers.modeling_utils")
    return None if module is None else module.PreTrainedModel


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP-style `.module` wrappers and `torch.compile` handles."""
    while True:
        inner = original_module(model)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        if inner is model:
            return model
        model = inner


class SavePretrained:
    """`model.save_pretrained` of an injected transformers model: the active adapter in lily's format plus a model
    card, never the base weights (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Trainer passes `state_dict` (FSDP/DeepSpeed gather it; names may carry wrapper prefixes) and calls this
        on its main process only; the adapter's values are then taken from `state_dict`."""
        if not is_main_process:
            return
        save_adapter(self.model, save_directory, state_dict=state_dict)
        hub.write_model_card(self.model, save_directory)
        if push_to_hub:
            repo_id = kwargs.get("repo_id") or Path(save_directory).name
            hub.push_to_hub(self.model, repo_id, token=token, commit_message=kwargs.get("commit_message"),
                         private=kwargs.get("private"))  # fmt: skip


class PushToHub:
    """`model.push_to_hub` of an injected transformers model: uploads the adapter and its card (`lily.push_to_hub`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        return hub.push_to_hub(self.model, repo_id, revision=revision, private=private, token=token,
                            commit_message=commit_message or "Upload Lily adapter")  # fmt: skip


INSTANCE_METHODS = {"save_pretrained": SavePretrained, "push_to_hub": PushToHub}


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Adds the Trainer guard whenever `transformers.trainer` is executed (its first import, or a reload)."""

    def __init__(self) -> None:
        self.local = threading.local()  # set while this thread's own lookup runs, so it does not find itself

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "transformers.trainer" or getattr(self.local, "finding", False):
            return None
        self.local.finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.local.finding = False
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        def exec_and_guard(module: ModuleType) -> None:
            try:
                type(loader).exec_module(loader, module)
            finally:
                del loader.exec_module  # the loader as it was
            _guard_trainer(module)

        loader.exec_module = exec_and_guard  # type: ignore[method-assign]
        return spec


_TRAINER_IMPORT_HOOK = _TrainerImportHook()


def _integrate(model: nn.Module, attached: bool) -> None:
    """Give an injected transformers model lily's `save_pretrained`/`push_to_hub` (or take them away again)."""
    pretrained = _pretrained_class()
    if pretrained is None or not isinstance(model, pretrained):
        return
    for attr, kind in INSTANCE_METHODS.items():
        if attached:
            model.__dict__[attr] = kind(model)
        elif isinstance(model.__dict__.get(attr), kind):
            del model.__dict__[attr]
    if not attached:
        return
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is not None:
        _guard_trainer(trainer_module)
    elif _TRAINER_IMPORT_HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _TRAINER_IMPORT_HOOK)


MODEL_INTEGRATIONS.append(_integrate)


def _holds_lily_adapter(directory: str | os.PathLike | None) -> bool:
    return directory is not None and any((Path(directory) / n).is_file() for n in (CONFIG_NAME, V1_CONFIG_NAME))


def _lily_model(model: nn.Module | None) -> nn.Module | None:
    inner = None if model is None else unwrap(model)
    return inner if inner is not None and find_adapters(inner) is not None else None


def _guard_trainer(trainer_module: ModuleType) -> None:
    """Wrap Trainer's checkpoint loading and model card, once per Trainer class (see the module docstring)."""
    trainer = trainer_module.Trainer
    if getattr(trainer, "_lily_guarded", False):
        return
    resume, best, card = trainer._load_from_checkpoint, trainer._load_best_model, trainer.create_model_card

    @functools.wraps(resume)
    def _load_from_checkpoint(self: Any, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        lily_model = _lily_model(self.model if model is None else model)
        if lily_model is None or not _holds_lily_adapter(resume_from_checkpoint):
            return resume(self, resume_from_checkpoint, model)
        load_adapter_weights(lily_model, resume_from_checkpoint)

    @functools.wraps(best)
    def _load_best_model(self: Any) -> None:
        lily_model = _lily_model(self.model)
        if lily_model is None or not _holds_lily_adapter(self.state.best_model_checkpoint):
            return best(self)
        load_adapter_weights(lily_model, self.state.best_model_checkpoint)

    @functools.wraps(card)
    def create_model_card(self: Any, *args: Any, **kwargs: Any) -> None:
        card(self, *args, **kwargs)
        lily_model = _lily_model(self.model)
        if lily_model is not None and self.is_world_process_zero():
            _merge_cards(lily_model, Path(self.args.output_dir))

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    trainer.create_model_card = create_model_card
    trainer._lily_guarded = True


def _merge_cards(model: nn.Module, directory: Path) -> None:
    """Make the card Trainer wrote in `directory` a lily card: lily's metadata and description, then Trainer's."""
    from huggingface_hub import ModelCard

    file = directory / "README.md"
    theirs = ModelCard.load(file) if file.is_file() else None
    ours = ModelCard(hub.model_card(model))
    if theirs is not None:
        data = theirs.data.to_dict()
        data.update({k: v for k, v in ours.data.to_dict().items() if v is not None})
        data["tags"] = sorted({*(theirs.data.tags or []), *(ours.data.tags or [])})
        ours = ModelCard(f"---\n{type(ours.data)(**data).to_yaml()}\n---\n\n{ours.text}\n{theirs.text}")
    ours.save(file)


def export_merged(model: nn.Module, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """Write `model` with its active adapter merged as a plain transformers model (`config.json`,
    `model.safetensors`), loadable by `AutoModel...from_pretrained(path)` without lily ("static"/"uniform"
    routing only; MergeError otherwise). The model itself is left unchanged.

    Example:
        >>> lily.export_merged(model, "out/merged")
    """
    model = original_module(model)
    pretrained = _pretrained_class()
    if pretrained is None or not isinstance(model, pretrained):
        raise CheckpointError(
            f"export_merged writes a transformers model; {type(model).__name__} is not one. Use "
            "lily.remove(model, merge=True) and save it your own way."
        )
    require_mergeable(model)
    state = _merged_state_dict(model)
    pretrained.save_pretrained(model, path, state_dict=state, **save_kwargs)


@torch.no_grad()
def _merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names, each adapted weight replaced by weight + s * B~ A."""
    renamed: dict[str, str] = {}  # prefix inside a wrapper -> prefix of the base module
    dropped = ["lily_adapters."]
    merged: dict[str, torch.Tensor] = {}
    for name, site in lily_layers(model):
        if not isinstance(site, LilyLayer):
            dropped.append(f"{name}.")
            continue
        dropped.append(f"{name}.adapters.")
        renamed[f"{name}.base_layer."] = f"{name}."
        if site.active is not None and site.merged is None:
            branch = site.adapters[site.active]
            up, down = branch.update_factors(branch.fixed_weights())
            weight = site.base_layer.weight
            merged[f"{name}.base_layer.weight"] = weight + site.weight_delta(up, down).to(weight.dtype)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(tuple(dropped)):
            continue
        prefix = next((p for p in renamed if key.startswith(p)), None)
        state[key if prefix is None else renamed[prefix] + key[len(prefix) :]] = merged.get(key, value)
    return state


def from_pretrained(
    path: str | os.PathLike,
    revision: str | None = None,
    *,
    name: str = "default",
    is_trainable: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """The base model recorded in the adapter at `path` (a directory or Hub repo id), loaded with transformers, with
    the adapter on it. `model_kwargs` (e.g. `torch_dtype`, `device_map`) go to the base model's `from_pretrained`.

    Example:
        >>> model = lily.from_pretrained("out/adapter")
    """
    directory = adapter_dir(path, revision)
    saved = read_adapter(directory)
    base = saved.meta.get("base_model_name_or_path")
    class_name = saved.meta.get("base_model_class")
    if not base or not class_name:
        raise CheckpointError(
            f"the adapter at '{path}' does not record its base model (saved from a model not loaded with "
            "transformers' from_pretrained); load the base model yourself and call lily.load_adapter(model, path)."
        )
    import transformers

    model_class = getattr(transformers, class_name, None)
    pretrained = _pretrained_class()
    if not isinstance(model_class, type) or pretrained is None or not issubclass(model_class, pretrained):
        raise CheckpointError(f"the adapter at '{path}' names base model class {class_name!r}, which transformers "
                              "does not have; load the base model yourself and call lily.load_adapter.")  # fmt: skip
    model_kwargs.setdefault("revision", saved.meta.get("base_model_revision"))
    model = model_class.from_pretrained(base, **model_kwargs)
    return load_adapter(model, directory, name=name, is_trainable=is_trainable)
