"""The Hugging Face Hub: adapters by repo id, uploads, and the model card that describes an adapter.

`huggingface_hub` (installed with transformers) is imported only when one of these runs. Downloads go
through `snapshot_download`, so `HF_HUB_OFFLINE=1` and a populated cache work without network.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from lily.adapter import get_adapter
from lily.io import base_model_id, save_adapter
from lily.report import count_parameters, summary

CARD_NAME = "README.md"


def model_card(
    model: nn.Module, name: str | None = None, training: dict[str, Any] | None = None, repo_id: str | None = None
) -> str:
    """A Hub model card (README.md) for adapter `name` of `model`: `library_name: lily`, the base model, the
    config, the parameter counts, how to load it (from `repo_id` when given), and, from `training` (e.g.
    `lily train`'s), the metrics and the command."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter = get_adapter(model, name)
    base, revision = base_model_id(model)
    data = ModelCardData(library_name="lily", base_model=base, tags=["lily", "peft", "adapter"])
    repo = repo_id or "path/to/this/folder"
    config = json.dumps(adapter.config.to_dict(), indent=2)
    lines = [
        f"# Lily adapter{f' for {base}' if base else ''}",
        "",
        "A [Lily](https://arxiv.org/abs/2407.09946) adapter (Low-Rank Interconnected Adaptation across Layers): "
        "A projectors shared by runs of layers, B experts shared by all layers of a target type, a router per layer.",
        "",
        f"- base model: `{base}`" + (f" (revision `{revision}`)" if revision else "")
        if base
        else "- base model: not recorded (load it yourself, then `lily.load_adapter`)",
        f"- adapter parameters: {count_parameters(model, adapter.name):,}",
        f"- routing: `{adapter.routing}` ({adapter.routing_reason})",
        "",
        "## Use",
        "",
        "```python",
        "import lily",
        f'model = lily.from_pretrained("{repo}")  # the base model above, with this adapter',
        f'# or, on a base model you loaded: lily.load_adapter(base_model, "{repo}")',
        "```",
        "",
        "## Configuration",
        "",
        "```json",
        config,
        "```",
        "",
        "```",
        summary(model, adapter.name),
        "```",
    ]
    if training:
        lines += ["", "## Training", ""]
        if training.get("command"):
            lines += ["```bash", str(training["command"]), "```", ""]
        for key, value in training.items():
            if key != "command":
                lines.append(f"- {key}: {value}")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_model_card(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                     training: dict[str, Any] | None = None, repo_id: str | None = None) -> None:  # fmt: skip
    """Write `model_card(...)` to `path`/README.md (replacing it atomically)."""
    directory = Path(path)
    fd, temp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(model_card(model, name, training, repo_id))
        os.chmod(temp, 0o644)
        os.replace(temp, directory / CARD_NAME)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    name: str | None = None,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload Lily adapter",
    training: dict[str, Any] | None = None,
) -> Any:
    """Upload adapter `name` of `model` (default: the active one) with its model card to Hub repository `repo_id`
    (created if needed); returns the commit info.

    Example:
        >>> lily.push_to_hub(model, "me/my-lily-adapter")
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lily-push-") as folder:
        save_adapter(model, folder, name)
        write_model_card(model, folder, name, training, repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
