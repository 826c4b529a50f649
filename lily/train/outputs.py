"""What a run writes to its output directory, and the check that the directory belongs to this run.

run.json             the configuration (written when the run starts)
adapter/             the best weights by validation metric (lily.save_adapter for Lily)
checkpoint/          the last resumable state (trainable tensors, optimizer, scheduler, RNG, progress)
metrics.json         counts, per-epoch curves, test metric before and after, time, memory
plot.png             training loss and validation metric per epoch
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lily.errors import LilyError
from lily.train.config import TrainConfig

RUN_FILE, METRICS_FILE, PLOT_FILE = "run.json", "metrics.json", "plot.png"
ADAPTER_DIR, CHECKPOINT_DIR = "adapter", "checkpoint"


class RunDirError(LilyError, ValueError):
    """The output directory holds another run, or has nothing to resume."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    test_before: float | None = None
    wall_time: float = 0.0


def write_json_atomic(path: Path, data: Any) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def check_output_dir(cfg: TrainConfig) -> Path:
    """Check, without writing, that `cfg.output_dir` is new, holds this same run (to resume), or may be replaced.

    Every process of a distributed run calls this and reaches the same verdict.
    """
    out = Path(cfg.output_dir)
    run_file = out / RUN_FILE
    if out.exists() and any(out.iterdir()):
        if not run_file.is_file():
            if not cfg.overwrite:
                raise RunDirError(f"--output-dir {out} is not empty and holds no lily run; choose another directory.")
        else:
            saved = json.loads(run_file.read_text())
            ours = cfg.run_identity()
            differs = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            if differs and not cfg.overwrite:
                raise RunDirError(
                    f"--output-dir {out} holds a different run (it differs in {', '.join(differs)}); choose another "
                    "--output-dir, or pass --overwrite to replace it."
                )
            if not differs and not cfg.resume and not cfg.overwrite:
                what = "finished" if (out / METRICS_FILE).is_file() else "unfinished"
                raise RunDirError(
                    f"--output-dir {out} already holds this {what} run; pass --resume to continue it or --overwrite "
                    "to start again."
                )
    if cfg.resume and not (out / CHECKPOINT_DIR).is_dir():
        raise RunDirError(f"--resume: {out} has no checkpoint to resume from; run without --resume first.")
    return out


def claim_output_dir(cfg: TrainConfig) -> None:
    """After `check_output_dir`: clear the directory if asked to overwrite, and record this run (main process)."""
    out = Path(cfg.output_dir)
    if cfg.overwrite and not cfg.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_FILE, cfg.run_identity())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    progress: Progress,
    rng: dict,
) -> None:
    """Write the resumable state to out/checkpoint, replacing the previous one only once complete."""
    temp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        save_file(tensors, temp / "trainable.safetensors")
        state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng,
                 "progress": asdict(progress)}  # fmt: skip
        torch.save(state, temp / "state.pt")
        final, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = out / CHECKPOINT_DIR
    tensors = load_file(directory / "trainable.safetensors")
    state = torch.load(directory / "state.pt", weights_only=False)
    return tensors, state


def write_plot(out: Path, history: list[dict[str, Any]], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    scored = [h for h in history if h["val_metric"] is not None]
    right.plot([h["epoch"] for h in scored], [h["val_metric"] for h in scored], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for axis in (left, right):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fd, temp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=out)
    os.close(fd)
    try:
        fig.savefig(temp, dpi=100)
        os.replace(temp, out / PLOT_FILE)
    finally:
        plt.close(fig)
        if os.path.exists(temp):
            os.remove(temp)
