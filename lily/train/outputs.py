"""What a run writes to its output directory, and the checks that the directory belongs to this run.

run.json             the configuration (written once data, model and method are ready); it marks a lily run
adapter/             the best weights by validation metric (lily.save_adapter for Lily)
checkpoint/          the last resumable state:
  current.json         the pointer {"format": "lily-checkpoint", "version": 1, "directory": "000007", "step": ...}
  000007/              trainable.safetensors (trainable tensors), state.safetensors + state.json (optimizer,
                       scheduler, RNG states, progress; see `encode_state`)
metrics.json         counts, curves (training loss per logged step, validation metric per evaluation, per-epoch
                     summaries), test metric before and after, time, memory
plot.png             those curves, with the untrained and trained test metric and other runs' as reference lines

Reading runs no code: every tensor is in a safetensors file and everything else in JSON.

A checkpoint is committed by one atomic rename: the new state goes into a fresh numbered directory, every
file and directory is synced, and only then is current.json replaced (through a synced temporary file) to name
it; the previous directory is deleted afterwards. A crash at any moment leaves the old checkpoint or the new
one, and the next save deletes what a crashed one left. Other files are written through a temporary file
renamed into place, with the default file mode.

A directory is a lily run when its run.json is a JSON object with the keys every lily run.json has
(`RUN_KEYS`). Nothing else is ever deleted: starting a run again (`--overwrite`, or the same run with nothing to
resume) removes only the entries lily writes (`LILY_ENTRIES`, and temporaries of interrupted writes), and only
once the run can start. A non-empty directory that is not a lily run is refused, even with `--overwrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lily.durable import fsync_dir, fsync_file, write_atomic, write_new
from lily.errors import LilyError
from lily.train.config import TrainConfig

RUN_FILE, METRICS_FILE, PLOT_FILE = "run.json", "metrics.json", "plot.png"
ADAPTER_DIR, CHECKPOINT_DIR = "adapter", "checkpoint"
POINTER_FILE, TRAINABLE_FILE, STATE_TENSORS_FILE, STATE_FILE = (
    "current.json", "trainable.safetensors", "state.safetensors", "state.json"
)  # fmt: skip
CHECKPOINT_FORMAT, STATE_FORMAT, FORMAT_VERSION = "lily-checkpoint", "lily-train-state", 1
LEGACY_STATE = "state.pt"
"""The state file of checkpoints older versions wrote with torch.save, refused: reading it can run code."""
RUN_KEYS = frozenset({"task", "model", "data", "method", "seed"})
"""Keys every run.json lily has written holds: what marks a directory as a lily run."""
LILY_ENTRIES = frozenset({RUN_FILE, METRICS_FILE, PLOT_FILE, ADAPTER_DIR, CHECKPOINT_DIR, "checkpoint.old"})
"""What lily writes in a run directory (checkpoint.old: a leftover of older versions)."""
LILY_TEMPORARY = re.compile(r"\.(?:(?:run\.json|metrics\.json|plot\.png)\.|plot-|checkpoint-).+")
"""Temporaries of interrupted writes in a run directory (`.run.json.<hex>.tmp`; older: `.checkpoint-<random>`)."""
SEQUENCE = re.compile(r"[0-9]+")
"""Names of the checkpoint directories under checkpoint/."""
NUMPY_KINDS = "biufc"
"""Kinds of numpy arrays a checkpoint holds (bool, integer, float, complex)."""


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
    """Per epoch: {"epoch", "step", "train_loss" (the epoch's mean), "val_metric" (None when not validated)}."""
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    """Every `log_every` steps: {"step", "train_loss"}, the mean over the batches since the previous entry."""
    val_curve: list[dict[str, Any]] = field(default_factory=list)
    """Every validation: {"step", "val_metric"}."""
    interval_loss_sum: float = 0.0
    interval_batches: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    test_before: float | None = None
    wall_time: float = 0.0
    skipped_steps: int = 0
    """Optimizer steps skipped because a gradient was not finite."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` by `data` as indented JSON, all or nothing."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_run(out: Path) -> dict[str, Any] | None:
    """The run identity in out/run.json, or None when `out` holds no lily run."""
    try:
        saved = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.keys() >= RUN_KEYS else None


def _has_checkpoint(out: Path) -> bool:
    root = out / CHECKPOINT_DIR
    return (root / POINTER_FILE).is_file() or (root / LEGACY_STATE).is_file()


def check_output_dir(cfg: TrainConfig) -> Path:
    """Check, without writing, that `cfg.output_dir` is new, holds this same run (to resume), or may be replaced.

    Every process of a distributed run calls this and reaches the same verdict.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file; choose a directory.")
    if out.is_dir() and any(out.iterdir()):
        saved = read_run(out)
        if saved is None:
            raise RunDirError(
                f"--output-dir {out} is not empty and holds no lily run (no run.json written by lily train); lily "
                "never deletes such a directory, not even with --overwrite: choose another --output-dir."
            )
        ours = cfg.run_identity()
        # an option a run from an older lily did not record had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        differs = sorted(k for k in set(saved) | set(ours) if saved.get(k, defaults.get(k)) != ours.get(k))
        if differs and (cfg.resume or not cfg.overwrite):
            fix = "--resume continues only that same run" if cfg.resume else "or pass --overwrite to replace it"
            raise RunDirError(
                f"--output-dir {out} holds a different run (it differs in {', '.join(differs)}); choose another "
                f"--output-dir, {fix}."
            )
        finished = (out / METRICS_FILE).is_file()
        if not differs and not cfg.resume and not cfg.overwrite and (finished or _has_checkpoint(out)):
            raise RunDirError(
                f"--output-dir {out} already holds this {'finished' if finished else 'unfinished'} run; pass --resume "
                "to continue it or --overwrite to start again."
            )
    if cfg.resume:
        checkpoint_dir(out)
    return out


def clear_run(out: Path) -> None:
    """Remove what lily train writes in run directory `out` (and temporaries of interrupted writes), nothing else.

    run.json goes last, so that a directory cleared only in part is still recognised as a lily run.
    """
    entries = [e for e in out.iterdir() if e.name in LILY_ENTRIES or LILY_TEMPORARY.fullmatch(e.name)]
    for entry in sorted(entries, key=lambda e: e.name == RUN_FILE):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def claim_output_dir(cfg: TrainConfig) -> None:
    """After `check_output_dir`, once the run can start (main process): unless resuming, clear what an earlier
    run left (`clear_run`), then record this run."""
    out = Path(cfg.output_dir)
    if not cfg.resume and read_run(out) is not None:
        clear_run(out)
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


def encode_state(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`value` (nested dicts, lists and tuples) as JSON-ready data, plus the tensors it refers to by key.

    JSON types stay as they are; anything else becomes an object whose first key starts with '@':
    {"@tensor": key}; {"@numpy": key, "dtype": "<u4", "shape": [624]} (the array's bytes as a uint8 tensor);
    {"@tuple": [...]}; {"@dict": [[key, value], ...]} for a dict with a key that is not a string or starts with
    '@'; {"@float": "inf"}, "-inf" or "nan".
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(v: Any) -> Any:
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"@float": str(float(v))}
        if isinstance(v, torch.Tensor):
            tensors[key := str(len(tensors))] = v.detach().cpu().contiguous()
            return {"@tensor": key}
        if isinstance(v, np.ndarray) and v.dtype.kind in NUMPY_KINDS:
            tensors[key := str(len(tensors))] = torch.from_numpy(np.frombuffer(v.tobytes(), np.uint8).copy())
            return {"@numpy": key, "dtype": v.dtype.str, "shape": list(v.shape)}
        if isinstance(v, tuple):
            return {"@tuple": [encode(x) for x in v]}
        if isinstance(v, list):
            return [encode(x) for x in v]
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("@") for k in v):
                return {k: encode(x) for k, x in v.items()}
            return {"@dict": [[encode(k), encode(x)] for k, x in v.items()]}
        raise TypeError(f"a checkpoint cannot hold a {type(v).__name__}.")

    return encode(value), tensors


def decode_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_state`. Only JSON types and its markers are accepted; anything else is a ValueError."""

    def decode(v: Any) -> Any:
        if isinstance(v, list):
            return [decode(x) for x in v]
        if not isinstance(v, dict):
            return v
        marker = next((k for k in v if k.startswith("@")), None)
        if marker is None:
            return {k: decode(x) for k, x in v.items()}
        body = v[marker]
        if marker == "@numpy" and v.keys() == {"@numpy", "dtype", "shape"} and isinstance(v["dtype"], str):
            dtype = np.dtype(v["dtype"])
            if dtype.kind in NUMPY_KINDS:
                return np.frombuffer(tensors[body].numpy().tobytes(), dtype).reshape(v["shape"]).copy()
        if len(v) == 1:
            if marker == "@tensor" and isinstance(body, str):
                return tensors[body]
            if marker == "@tuple" and isinstance(body, list):
                return tuple(decode(x) for x in body)
            if marker == "@dict" and isinstance(body, list):
                return {decode(k): decode(x) for k, x in body}
            if marker == "@float" and body in ("inf", "-inf", "nan"):
                return float(body)
        raise ValueError(f"unexpected entry {json.dumps(v)[:80]}")

    return decode(data)


def _current(root: Path) -> str | None:
    """The name of the checkpoint directory checkpoint/current.json names; None when there is no checkpoint."""
    pointer = root / POINTER_FILE
    if not pointer.is_file():
        if (root / LEGACY_STATE).exists():
            raise RunDirError(
                f"{root} holds a checkpoint of an older lily version (state.pt, written with torch.save), which "
                "lily no longer reads because loading it can run arbitrary code; start the run again with "
                "--overwrite (without --resume)."
            )
        return None
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        if data["format"] != CHECKPOINT_FORMAT or not SEQUENCE.fullmatch(data["directory"]):
            raise ValueError("not a lily checkpoint pointer")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{pointer} cannot be read ({exc}); start the run again with --overwrite.") from exc
    return data["directory"]


def checkpoint_dir(out: Path) -> Path:
    """The directory of the current checkpoint of run directory `out`."""
    name = _current(out / CHECKPOINT_DIR)
    if name is None:
        raise RunDirError(f"--resume: {out} has no checkpoint to resume from; run without --resume first.")
    return out / CHECKPOINT_DIR / name


def save_checkpoint(
    out: Path,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    progress: Progress,
    rng: dict,
) -> None:
    """Write the resumable state to a new directory under out/checkpoint and make it current in one atomic step.

    Leftovers of an earlier save that crashed are deleted first, the previous checkpoint once the new one is
    current.
    """
    root = out / CHECKPOINT_DIR
    if not root.is_dir():
        root.mkdir()
        fsync_dir(out)
    current = _current(root)
    for entry in root.iterdir():
        if entry.name != current and SEQUENCE.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
            entry.unlink()
    name = f"{int(current or 0) + 1:06d}"
    new = root / name
    new.mkdir()
    try:
        state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng,
                 "progress": asdict(progress)}  # fmt: skip
        encoded, state_tensors = encode_state(state)
        header = {"format": STATE_FORMAT, "version": FORMAT_VERSION, "state": encoded}
        write_new(new / STATE_FILE, json.dumps(header, allow_nan=False).encode())
        mode = (new / STATE_FILE).stat().st_mode & 0o777  # the default mode; safetensors creates files as 0600
        for file, content in ((TRAINABLE_FILE, tensors), (STATE_TENSORS_FILE, state_tensors)):
            save_file(content, new / file)
            os.chmod(new / file, mode)
            fsync_file(new / file)
        fsync_dir(new)
        fsync_dir(root)
        pointer = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "directory": name, "step": progress.step}
        write_atomic(root / POINTER_FILE, (json.dumps(pointer) + "\n").encode())
    except BaseException:
        with contextlib.suppress(RunDirError):
            if _current(root) != name:  # not committed: the new directory is only a leftover
                shutil.rmtree(new, ignore_errors=True)
        raise
    if current is not None:
        shutil.rmtree(root / current, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors and the state (optimizer, scheduler, rng, progress) of the current checkpoint."""
    directory = checkpoint_dir(out)

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        tensors = load_file(directory / TRAINABLE_FILE)
        header = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"), parse_constant=reject)
        if header["format"] != STATE_FORMAT or header["version"] != FORMAT_VERSION:
            raise ValueError(f"not a lily training state of version {FORMAT_VERSION}")
        state = decode_state(header["state"], load_file(directory / STATE_TENSORS_FILE))
        if not (isinstance(state, dict) and state.keys() >= {"optimizer", "scheduler", "rng", "progress"}):
            raise ValueError("the training state is incomplete")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise RunDirError(
            f"the checkpoint in {directory} cannot be read ({exc}); start the run again with --overwrite."
        ) from exc
    return tensors, state


class PlotError(LilyError, RuntimeError):
    """matplotlib cannot draw plot.png."""


def check_plotting() -> None:
    """Load matplotlib's Agg backend, which draws plot.png, as a run starts: a broken install fails before
    training rather than after it. Only the backend is loaded: pyplot and the user's backend are left alone."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except Exception as exc:  # ImportError, or a backend that fails as it loads
        raise PlotError(
            f"plot.png needs matplotlib's Agg backend, which cannot be loaded ({type(exc).__name__}: {exc}); "
            "reinstall it: pip install --force-reinstall matplotlib."
        ) from exc


COMPARABLE = ("task", "model", "data", "dataset_config", "test_split", "split_seed", "test_fraction",
              "max_test_samples")  # fmt: skip
"""Options two runs share when they score the same test examples, so that their test metrics compare."""


def read_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics.json of a finished run (`path`: its directory or the file), or None when there is none."""
    file = path / METRICS_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        return None
    return data if isinstance(data.get("test"), int | float) and isinstance(data.get("method"), str) else None


def baseline_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The metrics of the run `--baseline` names, checked as the run starts; None without `--baseline`."""
    if cfg.baseline is None:
        return None
    metrics = read_metrics(Path(cfg.baseline))
    if metrics is None:
        raise RunDirError(f"--baseline {cfg.baseline} holds no finished lily run (a run directory or its "
                          "metrics.json).")  # fmt: skip
    metric = cfg.metric or "perplexity"
    if metrics.get("metric") != metric:
        raise RunDirError(f"--baseline {cfg.baseline} reports {metrics.get('metric')} and this run {metric}; name "
                          "a run of the same task.")  # fmt: skip
    return metrics


def reference_runs(out: Path, cfg: TrainConfig, baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The finished runs whose test metric plot.png draws as a reference line: `--baseline`'s, else the newest
    run of each other method beside `out` that scored the same test examples with the same metric."""
    if baseline is not None:
        return [{"method": baseline["method"], "test": baseline["test"], "run": cfg.baseline}]
    metric = cfg.metric or "perplexity"
    newest: dict[str, tuple[float, Path, dict[str, Any]]] = {}
    for sibling in sorted(p for p in out.parent.iterdir() if p.is_dir() and p.name != out.name):
        metrics = read_metrics(sibling)
        if metrics is None or metrics["method"] == cfg.method or metrics.get("metric") != metric:
            continue
        if any(metrics["config"].get(k) != getattr(cfg, k) for k in COMPARABLE):
            continue
        written = (sibling / METRICS_FILE).stat().st_mtime
        if metrics["method"] not in newest or written > newest[metrics["method"]][0]:
            newest[metrics["method"]] = (written, sibling, metrics)
    return [{"method": m, "test": metrics["test"], "run": str(path)} for m, (_, path, metrics) in newest.items()]


def plot_figure(metrics: dict[str, Any], references: list[dict[str, Any]]) -> Any:
    """One figure of a run: training loss per logged step (left); validation metric per evaluation, with the
    untrained and trained test metric and the reference runs' test metric as lines (right)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cfg, metric = metrics["config"], metrics["metric"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_axis, metric_axis = fig.subplots(1, 2)
    curve = metrics["loss_curve"]
    loss_axis.plot([p["step"] for p in curve], [p["train_loss"] for p in curve], marker="." if len(curve) < 30 else "",
                   color="tab:blue", label=f"mean over {cfg['log_every']} steps")  # fmt: skip
    epochs = metrics["history"]
    loss_axis.plot([h["step"] for h in epochs], [h["train_loss"] for h in epochs], marker="s", linestyle="",
                   color="tab:orange", label="epoch mean")  # fmt: skip
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    val = metrics["val_curve"]
    metric_axis.plot([p["step"] for p in val], [p["val_metric"] for p in val], marker="o", color="tab:green",
                     label=f"{metrics['selected_on']} {metric}")  # fmt: skip
    if metrics["best_step"] is not None:  # None when no validation gave a number (a constant output's pearson)
        metric_axis.plot([metrics["best_step"]], [metrics["best_val"]], marker="*", markersize=14, color="tab:green",
                         linestyle="", label=f"best, step {metrics['best_step']}")  # fmt: skip
    lines = [("untrained (step 0)", metrics["test_before"], "0.45", "--"),
             (f"{metrics['method']} (best step)", metrics["test"], "tab:green", ":")]  # fmt: skip
    colors = iter(["tab:red", "tab:purple", "tab:orange", "tab:brown"])
    lines += [(ref["method"], ref["test"], next(colors, "tab:gray"), "-.") for ref in references]
    for label, value, color, style in lines:
        metric_axis.axhline(value, color=color, linestyle=style, label=f"test, {label}: {value:.4f}")
    if metric == "perplexity":
        metric_axis.set_yscale("log")
    metric_axis.set(xlabel="optimizer step", ylabel=metric, title=f"{metrics['selected_on']} {metric}; test as lines")
    for axis in (loss_axis, metric_axis):
        axis.set_xlim(0, max(1, metrics["steps"]) * 1.04)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for epoch in epochs[:-1]:
            axis.axvline(epoch["step"], color="0.88", linewidth=0.8, zorder=0)
        axis.legend(fontsize="small")
    names = f"{Path(cfg['model']).name} on {Path(cfg['data']).name}"
    fig.suptitle(f"{metrics['method']}, {names}: test {metric} {metrics['test_before']:.4f} → {metrics['test']:.4f}"
                 + ("   (grey lines: epoch ends)" if len(epochs) > 1 else ""))  # fmt: skip
    return fig


def write_plot(out: Path, metrics: dict[str, Any], references: list[dict[str, Any]]) -> None:
    """plot.png (`plot_figure`), written all or nothing."""
    png = io.BytesIO()
    plot_figure(metrics, references).savefig(png, dpi=100, format="png")
    write_atomic(out / PLOT_FILE, png.getvalue())
