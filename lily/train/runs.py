"""Open a finished `lily train` run: its configuration, its data, and its model with the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

from lily.train.config import TrainConfig
from lily.train.data import load_task_data
from lily.train.methods import load_trained
from lily.train.outputs import ADAPTER_DIR, RUN_FILE, RunDirError
from lily.train.tasks import Task, build_task, head_modules


def load_run(run_dir: str | Path) -> Task:
    """The task of a finished run, its `model` carrying the best weights (in eval mode)."""
    directory = Path(run_dir)
    if not (directory / RUN_FILE).is_file() or not (directory / ADAPTER_DIR).is_dir():
        raise RunDirError(f"{directory} holds no finished lily run (run.json and adapter/ are needed).")
    try:
        saved = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
        cfg = TrainConfig(**{**saved, "output_dir": str(directory)})
    except (OSError, ValueError, TypeError) as exc:  # ConfigError is a ValueError; unknown keys are a TypeError
        raise RunDirError(
            f"{directory / RUN_FILE} is damaged ({exc}); train the run again (lily train --overwrite ...)."
        ) from None
    task = build_task(cfg, load_task_data(cfg))
    task.model = load_trained(task.model, cfg, directory / ADAPTER_DIR, head_modules(task.model)).eval()
    return task
