"""`TrainConfig`: every option of `lily train`, with its default, allowed values and help text, in one place.

The command-line flags (in help groups) and the YAML keys are generated from these fields; precedence is
defaults < YAML file (`--config`) < flags given on the command line. Every value is checked when the config
is built, whatever its source: a bad one is a `ConfigError` naming the flag and what it accepts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lily.bank import INITS
from lily.errors import ConfigError
from lily.routing import ROUTING_MODES
from lily.train.metrics import CLASSIFICATION, REGRESSION

TASKS = ("text-cls", "text-reg", "causal-lm", "image-cls")
METHODS = ("lily", "lora", "peft-lily", "peft-vera", "full", "head-only")
SCHEDULES = ("linear", "cosine")
METRICS = CLASSIFICATION + REGRESSION
PROMPT_STYLES = ("chat", "alpaca")
TEST_SPLITS = ("test", "validation")
DEFAULT_MODEL = {"text-cls": "minilm", "text-reg": "minilm", "causal-lm": "smollm2", "image-cls": "dinov2"}
DEFAULT_DATA = {"text-cls": "tweets", "causal-lm": "chat", "image-cls": "fashion"}
GROUPS = {
    "data": "task and data",
    "model": "model, method and hardware",
    "adapter": "adapter (Lily; LoRA and VeRA for --method lora / peft-vera)",
    "optimisation": "optimisation",
    "evaluation": "evaluation",
    "output": "output",
}
"""Help groups of `lily train --help`, in order: field metadata `group` -> title."""
SEED_MAX = 2**32 - 1
"""The largest seed numpy accepts."""


@dataclass(frozen=True)
class Bounds:
    """The finite numbers a numeric option accepts: from `low` to `high`, ends included unless marked open."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return (isinstance(value, int) or math.isfinite(value)) and above and below

    def describe(self, kind: type) -> str:
        """'a whole number >= 1', 'a number in [0, 1)', ..."""
        noun = "a whole number" if kind is int else "a number"
        low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.low, self.high))
        if math.isfinite(self.low) and math.isfinite(self.high):
            return f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if math.isfinite(self.low):
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        return noun


POSITIVE = Bounds(1)
"""A whole number >= 1 (counts, sizes, ranks)."""
COUNT = Bounds(0)
"""A whole number or a number >= 0."""
ABOVE_ZERO = Bounds(0, low_open=True)
SEED = Bounds(0, SEED_MAX)


def _opt(group: str, default: Any, help: str, **kw: Any) -> Any:
    """A field: its help group, default and help text; `bounds` (numbers), `choices` (text), `shown` (the
    default as help states it, where the field's own default is None or depends on other options), `metavar`."""
    return field(default=default, metadata={"group": group, "help": help, **kw})


@dataclass
class TrainConfig:
    """Configuration of one training run (see `lily train --help`)."""

    # data
    task: str = _opt(
        "data",
        "text-cls",
        "text-cls (sequence classification), text-reg (a score per text, e.g. STS-B), causal-lm, or image-cls.",
        choices=TASKS,
    )
    data: str | None = _opt(
        "data",
        None,
        "Bundled dataset (tweets, bbc, chat, shakespeare, commonsense-mini, fashion), a local file (.csv, .tsv, "
        ".jsonl, .json, .txt) or folder of split files, an image folder (one sub-folder per class), a VTAB-1k list "
        "folder, or a Hugging Face `datasets` id.",
        shown="tweets, chat or fashion by --task; text-reg has none",
        metavar="NAME|PATH",
    )
    text_column: str = _opt(
        "data", "text", "Column holding the input text (text-cls/-reg, plain-text causal-lm); 'a|b' takes the first "
        "present."
    )  # fmt: skip
    text_pair_column: str | None = _opt(
        "data", None, "Column holding the second text of sentence-pair tasks (e.g. sentence2).", shown="single texts"
    )
    label_column: str = _opt("data", "label", "Column holding the class label or score (text-cls/-reg, image-cls).")
    prompt_column: str = _opt("data", "prompt", "Column holding the prompt or instruction (chat-style causal-lm).")
    input_column: str = _opt("data", "input", "Column holding an optional input that follows the instruction.")
    response_column: str = _opt("data", "response", "Column holding the reply (chat-style causal-lm files).")
    image_column: str = _opt("data", "image", "Column holding the image (image-cls from datasets).")
    columns: list[str] | None = _opt(  # noqa: RUF009
        "data",
        None,
        "Column names of header-less .csv/.tsv files, in order (GLUE's CoLA files have no header).",
        shown="the file's header row",
    )
    dataset_config: str | None = _opt("data", None, "Configuration of a Hugging Face dataset, e.g. cola for "
                                      "nyu-mll/glue.")  # fmt: skip
    test_split: str = _opt(
        "data",
        "test",
        "Source split scored as the test split. 'validation' for GLUE, whose test labels are hidden: the source's "
        "test split is then ignored.",
        choices=TEST_SPLITS,
    )
    prompt_style: str = _opt(
        "data",
        "chat",
        "How causal-lm prompts are framed: chat (the model's chat template) or alpaca (the '### Instruction: ... "
        "### Response:' template of Alpaca and LLM-Adapters).",
        choices=PROMPT_STYLES,
    )
    max_train_samples: int | None = _opt("data", 2000, "Use at most this many training examples; none: all.",
                                         bounds=POSITIVE)  # fmt: skip
    max_eval_samples: int | None = _opt("data", 500, "Use at most this many validation examples; none: all.",
                                        bounds=POSITIVE)  # fmt: skip
    max_test_samples: int | None = _opt("data", 1000, "Use at most this many test examples; none: all.",
                                        bounds=POSITIVE)  # fmt: skip
    val_fraction: float = _opt("data", 0.1, "Validation share carved out when the source has no validation split.",
                               bounds=Bounds(0, 1, high_open=True))  # fmt: skip
    test_fraction: float = _opt("data", 0.1, "Test share carved out when the source has no test split.",
                                bounds=Bounds(0, 1, low_open=True, high_open=True))  # fmt: skip
    split_seed: int = _opt("data", 0, "Seed of the train/validation/test split (kept fixed across training seeds).",
                           bounds=SEED)  # fmt: skip
    max_length: int | None = _opt("data", None, "Maximum tokens per example.", bounds=POSITIVE,
                                  shown="64; 128 for causal-lm")  # fmt: skip
    image_size: int = _opt("data", 56, "Images are resized to this square size (a multiple of the patch size).",
                           bounds=POSITIVE)  # fmt: skip

    # model, method and hardware
    model: str | None = _opt(
        "model",
        None,
        "Bundled model (minilm, smollm2, dinov2), a local model directory, or a Hugging Face model id.",
        shown="minilm, smollm2 or dinov2 by --task",
        metavar="NAME|PATH",
    )
    method: str = _opt("model", "lily", "lily, lora (PEFT, at Lily's parameter budget), peft-lily (PEFT's own Lily, "
                       "same r, A groups and experts), peft-vera (PEFT's VeRA: frozen shared random projections, "
                       "trained per-layer scales), full, or head-only.", choices=METHODS)  # fmt: skip
    model_dtype: str = _opt(
        "model",
        "float32",
        "Data type of the pretrained weights (bfloat16/float16 halve their memory; Lily's own tensors and a "
        "trainable head stay float32). For GPUs: CPUs without bf16 units run it far slower.",
        choices=("float32", "bfloat16", "float16"),
    )
    mixed_precision: str = _opt("model", "no", "accelerate's mixed precision.", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = _opt("model", False, "Recompute activations in the backward pass to save memory.")
    fsdp: bool = _opt(
        "model",
        False,
        "Shard parameters, gradients and optimizer state across processes with FSDP2 (launch with torchrun; "
        "--method lily); off: data-parallel (DDP).",
    )
    cpu: bool = _opt("model", False, "Train on the CPU even when a GPU is present.")

    # adapter
    targets: list[str] | None = _opt(  # noqa: RUF009
        "adapter",
        None,
        "Module-name suffixes to adapt; an entry 'a|b' takes the first alternative that names a module.",
        shown="the attention query and value projections",
    )
    parallel_modules: list[str] | None = _opt(  # noqa: RUF009
        "adapter", None, "Blocks that get a Lily parallel adapter, e.g. mlp (see LilyConfig.parallel_modules)."
    )
    parallel_r: int | None = _opt("adapter", None, "Rank of the parallel adapters.", bounds=POSITIVE,
                                  shown="2 x --r")  # fmt: skip
    r: int = _opt("adapter", 16, "Lily rank.", bounds=POSITIVE)
    num_A: int = _opt("adapter", 2, "Lily A groups per target type.", bounds=POSITIVE)
    num_B: int = _opt("adapter", 4, "Lily B experts per target type.", bounds=POSITIVE)
    scaling: float = _opt("adapter", 1.0, "Lily scaling s.", bounds=ABOVE_ZERO)
    budget: int | None = _opt("adapter", None, "Choose Lily's r as the largest whose adapter has at most this many "
                              "parameters (at --num-A/--num-B); overrides --r.", bounds=POSITIVE,
                              shown="use --r")  # fmt: skip
    budget_lora_rank: int | None = _opt("adapter", None, "Choose Lily's r as the largest that costs at most what LoRA "
                                        "of this rank costs on the same layers; overrides --r.", bounds=POSITIVE,
                                        shown="use --r")  # fmt: skip
    lily_init: str = _opt("adapter", "lora", "How Lily's A and B experts start: lora (A random, B zero) or experts (A "
                          "zero, distinct random experts).", choices=INITS)  # fmt: skip
    router_init_scale: float = _opt("adapter", 1.0, "Multiplies Lily's initial router weights (sharper, more "
                                    "layer-specific mixes above 1).", bounds=Bounds(0, 1e3, low_open=True))  # fmt: skip
    expert_diversity: float = _opt("adapter", 0.0, "Weight of a penalty on the squared cosine similarity between "
                                   "Lily's B experts, added to the loss.", bounds=COUNT)  # fmt: skip
    routing: str | None = _opt("adapter", None, "How Lily weighs its B experts.", choices=ROUTING_MODES,
                               shown="token for causal-lm, sample otherwise")  # fmt: skip
    adapter_dropout: float = _opt("adapter", 0.0, "Dropout on the adapter input (Lily, LoRA, VeRA).",
                                  bounds=Bounds(0, 1, high_open=True))  # fmt: skip
    lora_r: int | None = _opt("adapter", None, "LoRA rank.", bounds=POSITIVE,
                              shown="the rank whose parameter count is closest to Lily's")  # fmt: skip
    lora_alpha: float | None = _opt("adapter", None, "LoRA alpha.", bounds=ABOVE_ZERO, shown="2 x --lora-r")
    vera_r: int = _opt("adapter", 256, "VeRA rank (--method peft-vera): each adapted layer trains r + d_out scales.",
                       bounds=POSITIVE)  # fmt: skip

    # optimisation
    epochs: int = _opt("optimisation", 2, "Training epochs.", bounds=POSITIVE)
    max_steps: int | None = _opt("optimisation", None, "Stop after this many optimizer steps; none: run all epochs.",
                                 bounds=POSITIVE)  # fmt: skip
    batch_size: int = _opt("optimisation", 32, "Examples per device per step.", bounds=POSITIVE)
    grad_accum: int = _opt("optimisation", 1, "Gradient accumulation steps.", bounds=POSITIVE)
    lr: float = _opt("optimisation", 2e-3, "Peak learning rate.", bounds=ABOVE_ZERO)
    lr_ratio_B: float = _opt("optimisation", 1.0, "Learning-rate multiplier of the up-projections: Lily's B experts "
                             "and routers (PEFT's too), LoRA's B (LoRA+ uses 16), VeRA's output scales.",
                             bounds=ABOVE_ZERO)  # fmt: skip
    head_lr: float | None = _opt("optimisation", None, "Learning rate of a newly trained head.", bounds=ABOVE_ZERO,
                                 shown="--lr")  # fmt: skip
    weight_decay: float = _opt("optimisation", 0.0, "AdamW weight decay.", bounds=COUNT)
    warmup_ratio: float = _opt("optimisation", 0.06, "Share of steps with linear warm-up before the decay.",
                               bounds=Bounds(0, 1))  # fmt: skip
    warmup_steps: int | None = _opt("optimisation", None, "Steps of linear warm-up (overrides --warmup-ratio).",
                                    bounds=COUNT, shown="from --warmup-ratio")  # fmt: skip
    schedule: str = _opt("optimisation", "linear", "Decay after warm-up, down to --min-lr.", choices=SCHEDULES)
    min_lr: float = _opt("optimisation", 0.0, "Learning rate at the end of the decay (at most --lr).", bounds=COUNT)
    max_grad_norm: float = _opt("optimisation", 1.0, "Gradient clipping norm; 0: off.", bounds=COUNT)
    seed: int = _opt("optimisation", 0, "Seed of initialisation, data order and dropout.", bounds=SEED)

    # evaluation
    metric: str | None = _opt(
        "evaluation",
        None,
        "Metric that selects the best checkpoint and is reported: accuracy, mcc or f1 (classification), pearson "
        "(text-reg); causal-lm always reports perplexity.",
        choices=METRICS,
        shown="accuracy; pearson for text-reg",
    )
    eval_every: int = _opt("evaluation", 0, "Also validate every N optimizer steps; 0: only at epoch ends.",
                           bounds=COUNT)  # fmt: skip
    eval_epochs: int = _opt("evaluation", 1, "Validate at the end of every N-th epoch (and of the last).",
                            bounds=POSITIVE)  # fmt: skip
    select_on_test: bool = _opt(
        "evaluation",
        False,
        "Validate on the test split: the best checkpoint is the best test score (VTAB-1k's FacT/NOAH protocol; "
        "optimistic, so the metrics say so).",
    )

    # output
    output_dir: str = _opt("output", "out/run", "Directory for the adapter, checkpoints, metrics.json and plot.png.",
                           metavar="DIR")  # fmt: skip
    resume: bool = _opt("output", False, "Continue the run in --output-dir from its last checkpoint.")
    overwrite: bool = _opt(
        "output",
        False,
        "Replace the lily run found in --output-dir, once the new run can start: only lily's own files are deleted, "
        "and a directory that holds no lily run is never touched.",
    )
    log_every: int = _opt("output", 10, "Record the training loss (plot, metrics.json, progress) every N steps.",
                          bounds=POSITIVE)  # fmt: skip
    baseline: str | None = _opt(
        "output",
        None,
        "A finished run (its directory or metrics.json) whose test metric plot.png shows as a reference line.",
        shown="the newest finished run of another method beside --output-dir, with the same task, model and data",
        metavar="RUN",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if self.fsdp and self.method != "lily":
            raise ConfigError(f"--fsdp supports --method lily only, got --method {self.method}.")
        if self.expert_diversity and (self.method != "lily" or self.fsdp):
            raise ConfigError("--expert-diversity needs --method lily without --fsdp.")
        if self.method == "peft-lily":
            unsupported = {"--routing": self.routing not in (None, "batch"), "--lily-init": self.lily_init != "lora",
                           "--router-init-scale": self.router_init_scale != 1,
                           "--parallel-modules": bool(self.parallel_modules),
                           "--adapter-dropout": self.adapter_dropout != 0}  # fmt: skip
            if any(unsupported.values()):
                given = ", ".join(k for k, v in unsupported.items() if v)
                raise ConfigError(
                    f"--method peft-lily (PEFT's Lily) has no {given}; leave it out or use --method lily."
                )
        if self.method == "peft-vera":
            given = [flag for flag, value in (("--budget", self.budget), ("--budget-lora-rank", self.budget_lora_rank),
                     ("--lora-r", self.lora_r), ("--lora-alpha", self.lora_alpha)) if value is not None]  # fmt: skip
            if given:
                raise ConfigError(f"--method peft-vera sizes VeRA by --vera-r alone; leave out {', '.join(given)}.")
        if self.budget is not None and self.budget_lora_rank is not None:
            raise ConfigError("give --budget or --budget-lora-rank, not both.")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr must be in [0, --lr={self.lr:g}], got {self.min_lr:g}.")
        self.max_length = self.max_length or (128 if self.task == "causal-lm" else 64)
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
            if f.name in ("resume", "overwrite", "baseline") or value == f.default:
                continue
            if isinstance(value, bool):
                parts.append(f"--{'' if value else 'no-'}{_flag(f.name)}")
            else:
                values = value if isinstance(value, list) else [value]
                parts += [f"--{_flag(f.name)}", *(shlex.quote(str(v)) for v in values)]
        return " ".join(parts)

    def run_identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (not how it is launched, resumed, logged or plotted)."""
        launch = {"output_dir", "resume", "overwrite", "log_every", "cpu", "baseline"}
        return {k: v for k, v in self.to_dict().items() if k not in launch}


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@functools.cache
def _hints() -> dict[str, Any]:
    """TrainConfig's field types (evaluating them is slow, and every config checks every field)."""
    return typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> type:
    """int for 'int | None', list for 'list[str] | None', etc."""
    tp = _hints()[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(_hints()[name])


def allowed(f: dataclasses.Field) -> str:
    """What field `f` accepts, in words: 'a whole number >= 1', 'one of lily, lora, full, head-only', ..."""
    base = _base_type(f.name)
    if base is bool:
        text = "true or false"
    elif base is list:
        text = "a list of names"
    elif "choices" in f.metadata:
        text = f"one of {', '.join(f.metadata['choices'])}"
    elif base in (int, float):
        text = f.metadata.get("bounds", Bounds()).describe(base)
    else:
        text = "text"
    return text + (" or none" if _optional(f.name) else "")


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """`value` for field `f` (a number given as text converted, one name as a list of one), or a ConfigError
    naming the flag and what it accepts."""
    base = _base_type(f.name)
    if value is None and _optional(f.name):
        return None
    if base in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: refused below, as given
            value = base(value.strip())
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is list and isinstance(value, str):  # one module name, never a pattern
        value = [value]
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if ok and base is list:
        ok = all(isinstance(v, str) for v in value)
    elif ok and base in (int, float):
        ok = value in f.metadata.get("bounds", Bounds())
    elif ok and "choices" in f.metadata:
        ok = value in f.metadata["choices"]
    if not ok:
        raise ConfigError(f"--{_flag(f.name)} must be {allowed(f)}, got {value!r}.")
    return value


def _shown_default(f: dataclasses.Field) -> str:
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return "none" if f.default is None else f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def _text_or_none(text: str) -> str | None:
    """A flag's text; 'none' or 'null' unsets an optional option that a recipe or YAML file set."""
    return None if text.lower() in ("none", "null") else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in help groups (plus --config for a YAML file); unset flags stay absent.

    Flags pass their text on: TrainConfig converts and checks every value, so a flag and a YAML key are
    refused with the same message.
    """
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file whose keys are option names (flags given here override it).")  # fmt: skip
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        base = _base_type(f.name)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: "
                              f"{_shown_default(f)})".replace("%", "%%")}  # fmt: skip
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _text_or_none if _optional(f.name) else str
            kw["nargs"] = "+" if base is list else None
            kw["metavar"] = f.metadata.get("metavar") or ("{" + ",".join(f.metadata["choices"]) + "}"
                                                          if "choices" in f.metadata
                                                          else {int: "N", float: "X"}.get(base, "NAME"))  # fmt: skip
        groups[f.metadata["group"]].add_argument(f"--{_flag(f.name)}", dest=f.name, **kw)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then `base` (a recipe), then the YAML file in `args.config`, then explicitly
    given flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    # `--targets none` unsets a list option that a recipe or YAML file set
    values.update({k: None if isinstance(v, list) and v == [None] else v for k, v in given.items()})
    return TrainConfig(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"config file {path} has unknown option(s) {unknown}; see `lily train --help`.")
    return data
