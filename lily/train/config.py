"""`TrainConfig`: every option of `lily train`, with its default and help text, in one place.

The command-line flags and the YAML keys are generated from these fields; precedence is
defaults < YAML file (`--config`) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lily.errors import ConfigError
from lily.train.metrics import CLASSIFICATION, REGRESSION

TASKS = ("text-cls", "text-reg", "causal-lm", "image-cls")
METHODS = ("lily", "lora", "full", "head-only")
SCHEDULES = ("linear", "cosine")
METRICS = CLASSIFICATION + REGRESSION
PROMPT_STYLES = ("chat", "alpaca")
TEST_SPLITS = ("test", "validation")
DEFAULT_MODEL = {"text-cls": "minilm", "text-reg": "minilm", "causal-lm": "smollm2", "image-cls": "dinov2"}
DEFAULT_DATA = {"text-cls": "tweets", "causal-lm": "chat", "image-cls": "fashion"}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Configuration of one training run (see `lily train --help`)."""

    task: str = _opt(
        "text-cls",
        "text-cls (sequence classification), text-reg (a score per text, e.g. STS-B), causal-lm, or image-cls.",
        choices=TASKS,
    )
    model: str | None = _opt(
        None,
        "Bundled model (minilm, smollm2, dinov2), a local model directory, or a Hugging Face model id. "
        "Default: minilm / smollm2 / dinov2 for text-cls / causal-lm / image-cls.",
    )
    data: str | None = _opt(
        None,
        "Bundled dataset (tweets, bbc, chat, shakespeare, commonsense-mini, fashion), a local file (.csv, .tsv, "
        ".jsonl, .json, .txt) or folder of split files, an image folder (one sub-folder per class), a VTAB-1k list "
        "folder, or a Hugging Face `datasets` id. Default: tweets / chat / fashion.",
    )
    method: str = _opt("lily", "lily, lora (PEFT, at Lily's parameter budget), full, or head-only.", choices=METHODS)
    output_dir: str = _opt("out/run", "Directory for the adapter, checkpoints, metrics.json and plot.png.")
    metric: str | None = _opt(
        None,
        "Metric that selects the best checkpoint and is reported: accuracy, mcc or f1 (classification), pearson "
        "(text-reg). Default: accuracy, pearson for text-reg; causal-lm always uses perplexity.",
        choices=METRICS,
    )

    # data
    text_column: str = _opt(
        "text", "Column holding the input text (text-cls/-reg, plain-text causal-lm); 'a|b' takes the first present."
    )
    text_pair_column: str | None = _opt(None, "Column holding the second text of sentence-pair tasks (e.g. sentence2).")
    label_column: str = _opt("label", "Column holding the class label or score (text-cls/-reg, image-cls).")
    prompt_column: str = _opt("prompt", "Column holding the prompt or instruction (chat-style causal-lm files).")
    input_column: str = _opt("input", "Column holding an optional input that follows the instruction (causal-lm).")
    response_column: str = _opt("response", "Column holding the reply (chat-style causal-lm files).")
    image_column: str = _opt("image", "Column holding the image (image-cls from datasets).")
    columns: list[str] | None = _opt(  # noqa: RUF009
        None, "Column names of header-less .csv/.tsv files, in order (GLUE's CoLA files have no header)."
    )
    dataset_config: str | None = _opt(None, "Configuration of a Hugging Face dataset, e.g. cola for nyu-mll/glue.")
    test_split: str = _opt(
        "test",
        "Source split scored as the test split. 'validation' for GLUE, whose test labels are hidden: the source's "
        "test split is then ignored.",
        choices=TEST_SPLITS,
    )
    prompt_style: str = _opt(
        "chat",
        "How causal-lm prompts are framed: chat (the model's chat template) or alpaca (the '### Instruction: ... "
        "### Response:' template of Alpaca and LLM-Adapters).",
        choices=PROMPT_STYLES,
    )
    max_train_samples: int | None = _opt(2000, "Use at most this many training examples (None: all).")
    max_eval_samples: int | None = _opt(500, "Use at most this many validation examples (None: all).")
    max_test_samples: int | None = _opt(1000, "Use at most this many test examples (None: all).")
    val_fraction: float = _opt(0.1, "Validation share carved out when the source has no validation split.")
    test_fraction: float = _opt(0.1, "Test share carved out when the source has no test split.")
    split_seed: int = _opt(0, "Seed of the train/validation/test split (kept fixed across training seeds).")
    max_length: int | None = _opt(None, "Maximum tokens per example (default: 64 for text-cls, 128 for causal-lm).")
    image_size: int = _opt(56, "Images are resized to this square size (a multiple of the patch size).")

    # Lily
    targets: list[str] | None = _opt(None, "Module-name suffixes to adapt (default: attention query and value).")  # noqa: RUF009
    parallel_modules: list[str] | None = _opt(  # noqa: RUF009
        None, "Blocks that get a Lily parallel adapter, e.g. mlp (see LilyConfig.parallel_modules)."
    )
    parallel_r: int | None = _opt(None, "Rank of the parallel adapters (default: 2 * --r).")
    r: int = _opt(16, "Lily rank.")
    num_A: int = _opt(2, "Lily A groups per target type.")
    num_B: int = _opt(4, "Lily B experts per target type.")
    scaling: float = _opt(1.0, "Lily scaling s.")
    routing: str | None = _opt(None, "Lily routing mode (default: token for causal models, sample otherwise).")
    adapter_dropout: float = _opt(0.0, "Dropout on the adapter input (Lily and LoRA).")

    # LoRA baseline
    lora_r: int | None = _opt(None, "LoRA rank (default: the rank whose parameter count is closest to Lily's).")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: 2 * lora_r).")

    # optimisation
    epochs: int = _opt(2, "Training epochs.")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (None: run all epochs).")
    batch_size: int = _opt(32, "Examples per device per step.")
    grad_accum: int = _opt(1, "Gradient accumulation steps.")
    lr: float = _opt(2e-3, "Peak learning rate.")
    head_lr: float | None = _opt(None, "Learning rate of a newly trained head (default: --lr).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    warmup_ratio: float = _opt(0.06, "Share of steps with linear warm-up before the decay.")
    warmup_steps: int | None = _opt(None, "Steps of linear warm-up (overrides --warmup-ratio).")
    schedule: str = _opt("linear", "Decay after warm-up: linear or cosine, down to --min-lr.", choices=SCHEDULES)
    min_lr: float = _opt(0.0, "Learning rate at the end of the decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: off).")
    mixed_precision: str = _opt("no", "no, bf16 or fp16 (accelerate mixed precision).", choices=("no", "bf16", "fp16"))
    model_dtype: str = _opt(
        "float32",
        "Data type of the pretrained weights: float32, bfloat16 or float16 (halves their memory; Lily's own tensors "
        "stay float32). A trainable head is cast to float32. For GPUs: CPUs without bf16 units run it far slower.",
        choices=("float32", "bfloat16", "float16"),
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    fsdp: bool = _opt(
        False,
        "Shard parameters, gradients and optimizer state across processes with FSDP2 (launch with torchrun; "
        "--method lily). Default: data-parallel (DDP).",
    )
    seed: int = _opt(0, "Seed of initialisation, data order and dropout.")
    eval_every: int = _opt(0, "Also validate every N optimizer steps (0: only at epoch ends).")
    eval_epochs: int = _opt(1, "Validate at the end of every N-th epoch (and of the last).")
    select_on_test: bool = _opt(
        False,
        "Validate on the test split: the best checkpoint is the best test score (VTAB-1k's FacT/NOAH protocol; "
        "optimistic, so the metrics say so).",
    )
    log_every: int = _opt(10, "Update the progress bar's loss every N steps.")
    cpu: bool = _opt(False, "Train on the CPU even when a GPU is present.")
    resume: bool = _opt(False, "Continue the run in --output-dir from its last checkpoint.")
    overwrite: bool = _opt(
        False,
        "Replace the lily run found in --output-dir, once the new run can start: only lily's own files are deleted, "
        "and a directory that holds no lily run is never touched.",
    )

    def __post_init__(self) -> None:
        for name in ("task", "method", "mixed_precision", "schedule", "test_split", "prompt_style", "model_dtype"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)!r}: choose one of {', '.join(choices)}.")
        self.max_length = self.max_length or (128 if self.task == "causal-lm" else 64)
        for name in ("epochs", "batch_size", "grad_accum", "r", "num_A", "num_B", "max_length", "image_size",
                     "eval_epochs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}.")
        if self.fsdp and self.method != "lily":
            raise ConfigError(f"--fsdp supports --method lily only, got --method {self.method}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}.")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}.")
        if not 0 <= self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ConfigError("--val-fraction must be in [0, 1) and --test-fraction in (0, 1).")
        self.metric = self._check_metric()
        self.model = self.model or DEFAULT_MODEL[self.task]
        if self.data is None and self.task not in DEFAULT_DATA:
            raise ConfigError(f"--task {self.task} has no bundled dataset; name one with --data.")
        self.data = self.data or DEFAULT_DATA[self.task]

    def _check_metric(self) -> str | None:
        allowed = {"text-reg": REGRESSION, "causal-lm": ()}.get(self.task, CLASSIFICATION)
        if self.metric is None:
            return allowed[0] if allowed else None
        if self.metric not in allowed:
            told = ", ".join(allowed) if allowed else "none (perplexity is fixed)"
            raise ConfigError(f"--metric={self.metric!r} does not fit --task {self.task}; choose {told}.")
        return self.metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The `lily train` command line that gives this config (flags for the values that differ from defaults)."""
        parts = ["lily", "train"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("resume", "overwrite") or value == (f.default_factory() if f.default is dataclasses.MISSING
                                                              else f.default):  # fmt: skip
                continue
            if isinstance(value, bool):
                parts.append(f"--{'' if value else 'no-'}{_flag(f.name)}")
            else:
                values = value if isinstance(value, list) else [value]
                parts += [f"--{_flag(f.name)}", *(shlex.quote(str(v)) for v in values)]
        return " ".join(parts)

    def run_identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (not how it is launched or resumed)."""
        launch = {"output_dir", "resume", "overwrite", "log_every", "cpu"}
        return {k: v for k, v in self.to_dict().items() if k not in launch}


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """int for 'int | None', list for 'list[str] | None', etc."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[annotation] if isinstance(annotation, str) else annotation
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    return typing.get_origin(tp) or tp


def _none_or(cast: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else cast(text)

    parse.__name__ = cast.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (plus --config for a YAML file); unset flags stay absent."""
    parser.add_argument("--config", help="YAML file whose keys are option names (flags given here override it).")
    for f in dataclasses.fields(TrainConfig):
        base = _base_type(f.name)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = _none_or(base)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, **kw)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then `base` (a recipe), then the YAML file in `args.config`, then explicitly
    given flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    # `--targets none` unsets a list option that a recipe or YAML file set
    values.update({k: None if isinstance(v, list) and [x.lower() for x in v] == ["none"] else v
                   for k, v in given.items()})  # fmt: skip
    return TrainConfig(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values.")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"config file {path} has unknown option(s) {unknown}; see `lily train --help`.")
    return data
